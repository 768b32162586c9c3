"""Times transformers' Qwen2-VL image processor on a folder of images, one core.

Called by `omr bench data` in the same run as our own pipeline so that the ratio compares like
with like: same images, same preprocessor_config.json, same machine, one thread each. Decoding
(PIL open + RGB conversion) is included, as it is on our side.

    python scripts/bench/hf_image_processor.py PREPROCESSOR_DIR IMAGE_DIR REPEATS

Prints one JSON line: {"images": n, "megapixels": mp, "seconds": s, "transformers": version}.
"""
import json
import os
import sys
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

from PIL import Image  # noqa: E402
import transformers  # noqa: E402
from transformers import Qwen2VLImageProcessor  # noqa: E402


def main():
    proc_dir, image_dir, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
    processor = Qwen2VLImageProcessor.from_pretrained(proc_dir)
    paths = sorted(os.path.join(image_dir, f) for f in os.listdir(image_dir))
    blobs = [open(p, "rb").read() for p in paths]
    import io

    def one_pass():
        mp = 0.0
        for b in blobs:
            img = Image.open(io.BytesIO(b))
            img = img.convert("RGB")
            mp += img.width * img.height / 1e6
            processor(images=[img], return_tensors="np")
        return mp

    one_pass()  # warm-up
    start = time.perf_counter()
    mp = 0.0
    for _ in range(repeats):
        mp += one_pass()
    seconds = time.perf_counter() - start
    print(json.dumps({"images": len(blobs) * repeats, "megapixels": mp, "seconds": seconds,
                      "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
