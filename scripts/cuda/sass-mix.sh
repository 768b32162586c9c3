#!/usr/bin/env bash
# The instruction mix of the kernels' machine code (SASS), without a GPU: compiles every
# kernels/*.cu as compile-ptx.sh does, disassembles the cubins with nvdisasm (NVIDIA's wheel,
# installed once next to the nvcc wheels) and prints, per entry point, the static count of all
# instructions and of those that say where issue slots go: tensor-core ops (HMMA, HGMMA), SFU
# exponentials, cp.async copies, the float ops of a softmax, `exp2f`'s subnormal test
# (FSETP.GEU), divergence bookkeeping (BSSY, BREAK, WARPSYNC), register moves and barriers.
# Static counts, not a profile: a loop body counts once, both sides of a branch count. What
# kernels/README.md says of the attention's inner loops was read this way.
#
#   scripts/cuda/sass-mix.sh [FILTER]    # entry points whose name contains FILTER (default: attention)
#   CUDA_COMPUTE_CAP=80 scripts/cuda/sass-mix.sh flash_mma_fwd
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
filter=${1:-flash_}
# shellcheck disable=SC1091
OMR_CUDA_PROFILE=ptx source "$root/scripts/cuda/env.sh"
dir=${OMR_CUDA_DIR:-$HOME/.cache/omr-cuda}
wheel="nvidia-cuda-nvdisasm==13.2.51"  # the oldest on PyPI; reads sm_80 / sm_90 cubins
if [ "$(cat "$dir/installed-nvdisasm.txt" 2>/dev/null)" != "$wheel" ]; then
  "$dir/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel" >&2
  echo "$wheel" > "$dir/installed-nvdisasm.txt"
fi
nvdisasm=$(ls "$dir"/venv/lib/python3*/site-packages/nvidia/cu13/bin/nvdisasm | head -n 1)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$root/scripts/cuda/compile-ptx.sh" "$out" >/dev/null
for cubin in "$out"/*.cubin; do
  "$nvdisasm" -c "$cubin" > "$cubin.sass"
done
python3 - "$filter" "$out"/*.sass <<'EOF'
import re, sys
from collections import Counter

cols = [("all", None), ("HMMA", "HMMA"), ("HGMMA", "HGMMA"), ("EX2", "MUFU.EX2"),
        ("LDGSTS", "LDGSTS"), ("LDSM", "LDSM"), ("FMUL", "FMUL"), ("FFMA", "FFMA"),
        ("FSETP.GEU", "FSETP.GEU"), ("BSSY", "BSSY"), ("BREAK", "BREAK"),
        ("WARPSYNC", "WARPSYNC"), ("MOV", "MOV"), ("BAR", "BAR")]
filt = sys.argv[1]
print("| entry | " + " | ".join(c for c, _ in cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for path in sys.argv[2:]:
    funcs, cur = {}, None
    for line in open(path):
        m = re.match(r"^\.text\.(\S+):", line)
        if m:
            cur = m.group(1)
            funcs[cur] = Counter()
            continue
        m = re.match(r"^\s+/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and cur:
            funcs[cur][m.group(1)] += 1
    for name in sorted(funcs):
        if filt not in name:
            continue
        c = funcs[name]
        row = []
        for _, op in cols:
            row.append(sum(c.values()) if op is None else
                       sum(v for k, v in c.items() if k.startswith(op) or
                           (op == "MOV" and k.startswith("IMAD.MOV"))))
        print(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
EOF
