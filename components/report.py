"""The evaluation report: a confusion-matrix PNG and a self-contained Markdown file.

Images are embedded as data URIs so the one file reads the same in the KFP UI, in the model
registry and on a laptop, with no relative paths to break.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

THUMBNAIL_PX = 96


def confusion_png(confusion: list[list[int]], classes: list[str]) -> bytes:
    """Row-normalised heat map (rows: true class), counts in the cells while they fit."""
    matrix = np.asarray(confusion, dtype=np.float64)
    n = len(classes)
    cell = max(12, min(48, 720 // max(n, 1)))
    font = ImageFont.load_default()
    label_width = min(160, 8 + 7 * max(len(name) for name in classes))
    top = 28
    # Wide enough for the title line even with two or three classes.
    width, height = max(label_width + n * cell + 8, 380), top + n * cell + label_width
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 6), "true class (rows) vs predicted (columns), row-normalised", fill="black", font=font)
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    for i in range(n):
        draw.text((4, top + i * cell + cell // 2 - 5), classes[i][:22], fill="black", font=font)
        for j in range(n):
            level = int(255 - 200 * shares[i, j])
            colour = (level, level, 255) if i == j else (255, level, level)
            box = (
                label_width + j * cell,
                top + i * cell,
                label_width + (j + 1) * cell - 1,
                top + (i + 1) * cell - 1,
            )
            draw.rectangle(box, fill=colour, outline=(220, 220, 220))
            if cell >= 24 and matrix[i, j]:
                draw.text(
                    (box[0] + 3, box[1] + cell // 2 - 5), str(int(matrix[i, j])), fill="black", font=font
                )
    column_labels = Image.new("RGB", (label_width, n * cell), "white")
    column_draw = ImageDraw.Draw(column_labels)
    for j in range(n):
        column_draw.text((4, j * cell + cell // 2 - 5), classes[j][:22], fill="black", font=font)
    image.paste(column_labels.rotate(90, expand=True), (label_width, top + n * cell))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def thumbnail_jpeg(encoded: bytes) -> bytes:
    with Image.open(io.BytesIO(encoded)) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown(
    evaluation: dict[str, Any], confusion: bytes, examples: dict[tuple[str, str], list[dict]]
) -> str:
    candidate = evaluation["candidate"]
    production = evaluation.get("production")
    decision = evaluation["decision"]
    k = candidate["top_k"]
    lines = [
        f"# Evaluation on the {candidate['split']} split ({candidate['examples']} images)",
        "",
        f"**{'Blessed' if decision['blessed'] else 'Not blessed'}**: " + "; ".join(decision["reasons"]),
        "",
        "| check | passed | detail |",
        "|---|---|---|",
        *[
            f"| {c['check']} | {'yes' if c['passed'] else '**no**'} | {c['detail']} |"
            for c in decision["checks"]
        ],
        "",
        "## Headline metrics",
        "",
        "| metric | candidate | production |",
        "|---|---|---|",
    ]
    for key in (
        "accuracy",
        f"top_{k}_accuracy",
        "macro_f1",
        "macro_precision",
        "macro_recall",
        "expected_calibration_error",
    ):
        before = production["metrics"].get(key) if production and production.get("metrics") else None
        lines.append(f"| {key} | {_number(candidate[key])} | {_number(before)} |")
    if production:
        lines += ["", f"Production: {production.get('note', '')}."]
    lines += [
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support | production recall |",
        "|---|---|---|---|---|---|",
    ]
    production_classes = (production or {}).get("metrics", {}) or {}
    for name, stats in candidate["per_class"].items():
        before = production_classes.get("per_class", {}).get(name)
        lines.append(
            f"| {name} | {stats['precision']:.4f} | {stats['recall']:.4f} | {stats['f1']:.4f} | "
            f"{stats['support']} | {_number(before['recall']) if before else '-'} |"
        )
    lines += [
        "",
        "## Confusion matrix",
        "",
        f"![confusion matrix]({data_uri(confusion, 'image/png')})",
        "",
        f"Expected calibration error ({candidate['calibration']['bins']} equal-width confidence bins): "
        f"{candidate['expected_calibration_error']:.4f} (0 = confidence matches accuracy).",
        "",
        "## Most confused pairs",
        "",
    ]
    if not candidate["confused_pairs"]:
        lines.append("No test image was misclassified.")
    for pair in candidate["confused_pairs"]:
        lines.append(
            f"- **{pair['true']}** taken for **{pair['predicted']}**: {pair['count']} of "
            f"{pair['support']} ({pair['share']:.1%})"
        )
        for example in examples.get((pair["true"], pair["predicted"]), []):
            lines.append(
                f"  - ![{example['source']}]({data_uri(example['thumbnail'], 'image/jpeg')}) "
                f"`{example['source']}` (confidence {example['confidence']:.2f})"
            )
    return "\n".join(lines) + "\n"
