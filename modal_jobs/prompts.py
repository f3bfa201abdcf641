"""The one place that knows the instruction and the message layout.

Training, local generation and the evaluation client all build their messages here, so the prompt the
model is trained on and the prompt the server receives cannot drift apart. (The original script trained on
[text, image] and evaluated with [image, text].)
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image

DEFAULT_INSTRUCTION = "Write the LaTeX representation for this image."


def user_turn(instruction: str, image: Any = None) -> dict[str, Any]:
    """The user turn in the processor's chat format: instruction first, then the image.

    `image` is left out for TRL's vision collator, which takes the images from the row's `images` column.
    """
    image_part: dict[str, Any] = {"type": "image"}
    if image is not None:
        image_part["image"] = image
    return {"role": "user", "content": [{"type": "text", "text": instruction}, image_part]}


def assistant_turn(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def training_row(image: Image, text: str, instruction: str) -> dict[str, Any]:
    """A row for TRL's vision SFT: conversational prompt/completion, so the loss covers the answer only."""
    return {
        "images": [image.convert("RGB")],
        "prompt": [user_turn(instruction)],
        "completion": [assistant_turn(text)],
    }


def generation_messages(image: Image, instruction: str) -> list[dict[str, Any]]:
    """Messages for `processor.apply_chat_template(..., add_generation_prompt=True)` in local generation."""
    return [user_turn(instruction, image.convert("RGB"))]


def image_data_uri(image: Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_messages(image: Image, instruction: str) -> list[dict[str, Any]]:
    """The same user turn for an OpenAI-compatible endpoint (image as a base64 PNG data URI)."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": instruction},
                {"type": "image_url", "image_url": {"url": image_data_uri(image)}},
            ],
        }
    ]
