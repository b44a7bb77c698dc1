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


def reliability_png(table: list[dict[str, Any]], bins: int, size: int = 320) -> bytes:
    """Reliability diagram: per confidence bin, the accuracy (bar) against the mean confidence
    (tick); on the diagonal, confidence matches accuracy. Bars shaded by how many predictions
    fall in the bin; empty bins are left out."""
    font = ImageFont.load_default()
    margin, top = 36, 24
    plot = size - margin - 8
    image = Image.new("RGB", (size, size + 20), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 6), "accuracy (bars) vs confidence (ticks), per bin", fill="black", font=font)

    def point(x: float, y: float) -> tuple[float, float]:
        return margin + x * plot, top + (1 - y) * plot

    draw.rectangle((*point(0, 1), *point(1, 0)), outline="black")
    draw.line((*point(0, 0), *point(1, 1)), fill=(160, 160, 160), width=1)
    most = max((row["count"] for row in table), default=1)
    for row in table:
        shade = int(230 - 150 * row["count"] / most)
        draw.rectangle(
            (*point(row["low"], row["accuracy"]), *point(row["high"], 0)), fill=(shade, shade, 255)
        )
        x0, y = point(row["low"], row["confidence"])
        x1, _ = point(row["high"], row["confidence"])
        draw.line((x0, y, x1, y), fill=(200, 0, 0), width=2)
    for tick in (0.0, 0.5, 1.0):
        draw.text((point(tick, 0)[0] - 8, top + plot + 4), f"{tick:.1f}", fill="black", font=font)
        draw.text((4, point(0, tick)[1] - 5), f"{tick:.1f}", fill="black", font=font)
    draw.text(
        (margin + plot // 2 - 30, top + plot + 16), f"confidence ({bins} bins)", fill="black", font=font
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


CURVE_COLOURS = {
    "loss": (0, 90, 200),
    "val_loss": (0, 90, 200),
    "accuracy": (200, 60, 0),
    "val_accuracy": (200, 60, 0),
}


def curves_png(history: list[dict[str, Any]], width: int = 480, height: int = 240) -> bytes:
    """Training curves per epoch, two panels: loss and accuracy, train solid and validation
    dashed, each panel's y axis spanning its own values."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    panel = (width - 24) // 2
    for index, (title, keys) in enumerate(
        (("loss", ("loss", "val_loss")), ("accuracy", ("accuracy", "val_accuracy")))
    ):
        box = (36 + index * (panel + 8), 22, panel - 36, height - 52)
        _curve_panel(draw, box, title, history, keys)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _curve_panel(
    draw, box: tuple[int, int, int, int], title: str, history: list[dict], keys: tuple[str, str]
) -> None:
    font = ImageFont.load_default()
    left, top, plot_w, plot_h = box
    epochs = [row["epoch"] for row in history] or [0]
    values = [row[key] for row in history for key in keys if isinstance(row.get(key), int | float)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    high = high if high > low else low + 1.0
    span = max(epochs[-1] - epochs[0], 1)
    draw.text((left, 6), f"{title} (solid: train, dashed: validation)", fill="black", font=font)
    draw.rectangle((left, top, left + plot_w, top + plot_h), outline="black")
    draw.text((left - 28, top - 4), f"{high:.2f}", fill="black", font=font)
    draw.text((left - 28, top + plot_h - 8), f"{low:.2f}", fill="black", font=font)
    draw.text((left, top + plot_h + 4), f"epoch {epochs[0]}", fill="black", font=font)
    draw.text((left + plot_w - 40, top + plot_h + 4), f"epoch {epochs[-1]}", fill="black", font=font)
    for key in keys:
        colour = CURVE_COLOURS[key]
        points = [
            (
                left + (row["epoch"] - epochs[0]) / span * plot_w,
                top + (1 - (row[key] - low) / (high - low)) * plot_h,
            )
            for row in history
            if isinstance(row.get(key), int | float)
        ]
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            # Validation dashed: the first half of each segment drawn.
            end = ((x0 + x1) / 2, (y0 + y1) / 2) if key.startswith("val_") else (x1, y1)
            draw.line((x0, y0, *end), fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)


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
    evaluation: dict[str, Any],
    confusion: bytes,
    examples: dict[tuple[str, str], list[dict]],
    reliability: bytes | None = None,
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
        *([f"![reliability diagram]({data_uri(reliability, 'image/png')})", ""] if reliability else []),
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
