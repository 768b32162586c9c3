//! What the Qwen2-VL family fixes about text: its special tokens and its chat template.
//!
//! The template is the `chat_template` of `Qwen/Qwen2-VL-7B-Instruct` (`chat_template.json`
//! on the Hub's main branch; `Qwen/Qwen2.5-VL-7B-Instruct` ships the same text). It is kept
//! here for the tokenizers this crate trains itself (`tokenizer_train`), which have no Hub
//! folder to read a template from; `tests/fixtures/chat/qwen2_vl.jinja` holds the same text
//! and a test checks the two agree.

/// The Qwen2-VL added special tokens, in their id order (`<|endoftext|>` = 151643 in Qwen).
/// `<think>` / `<answer>` are deliberately not here: they are ordinary text for Qwen2-VL.
pub const QWEN2_VL_SPECIAL_TOKENS: [&str; 14] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const VISION_START: &str = "<|vision_start|>";
pub const VISION_END: &str = "<|vision_end|>";
pub const IMAGE_PAD: &str = "<|image_pad|>";

/// The Qwen2-VL chat template, byte for byte (1017 bytes, no trailing newline).
pub const QWEN2_VL_CHAT_TEMPLATE: &str = concat!(
    "{% set image_count = namespace(value=0) %}",
    "{% set video_count = namespace(value=0) %}",
    "{% for message in messages %}",
    "{% if loop.first and message['role'] != 'system' %}",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "{% endif %}",
    "<|im_start|>{{ message['role'] }}\n",
    "{% if message['content'] is string %}",
    "{{ message['content'] }}<|im_end|>\n",
    "{% else %}",
    "{% for content in message['content'] %}",
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}",
    "{% set image_count.value = image_count.value + 1 %}",
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "{% elif content['type'] == 'video' or 'video' in content %}",
    "{% set video_count.value = video_count.value + 1 %}",
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}",
    "<|vision_start|><|video_pad|><|vision_end|>",
    "{% elif 'text' in content %}",
    "{{ content['text'] }}",
    "{% endif %}",
    "{% endfor %}",
    "<|im_end|>\n",
    "{% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
);
