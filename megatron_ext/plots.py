"""PNG charts, drawn with Pillow: the one plotting stack of every tool.

Pillow rather than matplotlib: matplotlib is not a dependency of this project, while Pillow is
always installed (TensorBoard, which we pin, requires it), so the charts never go missing.

  heatmap(...)     needle tasks: accuracy per (length, depth), red (0) to green (1), values written
  line_plot(...)   ppl-by-position: loss per position bucket, one line per length
  bar_chart(...)   grouped bars: LADM score histograms, LongRecipe token-class shares
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> Tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _accuracy_color(value: float) -> Tuple[int, int, int]:
    """Red -> yellow -> green."""
    value = min(max(value, 0.0), 1.0)
    if value < 0.5:
        return 215, int(48 + 2 * value * (200 - 48)), 39
    return int(215 - 2 * (value - 0.5) * (215 - 26)), int(200 - 2 * (value - 0.5) * (200 - 150)), \
        int(39 + 2 * (value - 0.5) * (80 - 39))


def heatmap(path: str, title: str, lengths: Sequence[str], depths: Sequence[str],
            accuracy: Sequence[Sequence[float]]) -> None:
    """``accuracy[i][j]``: length ``lengths[i]`` (rows) at depth ``depths[j]`` (columns)."""
    font, small = _font(16), _font(13)
    cell_w, cell_h, left, top = 78, 40, 110, 70
    width = left + cell_w * len(depths) + 30
    height = top + cell_h * len(lengths) + 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black", font=font)
    draw.text((left, 38), "needle depth (0 = start of context, 1 = end)", fill="black", font=small)
    for i, length in enumerate(lengths):
        y = top + i * cell_h
        tw, th = _text_size(draw, str(length), small)
        draw.text((left - tw - 10, y + (cell_h - th) // 2), str(length), fill="black", font=small)
        for j, _ in enumerate(depths):
            x = left + j * cell_w
            value = accuracy[i][j]
            draw.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=_accuracy_color(value))
            label = f"{value:.2f}"
            tw, th = _text_size(draw, label, small)
            draw.text((x + (cell_w - tw) // 2, y + (cell_h - th) // 2), label, fill="black", font=small)
    for j, depth in enumerate(depths):
        tw, _ = _text_size(draw, str(depth), small)
        draw.text((left + j * cell_w + (cell_w - tw) // 2, top + cell_h * len(lengths) + 6),
                  str(depth), fill="black", font=small)
    draw.text((10, top - 22), "length", fill="black", font=small)
    image.save(path)


def _ticks(low: float, high: float, count: int = 5) -> List[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * k / (count - 1) for k in range(count)]


def line_plot(path: str, title: str, series: Dict[str, Sequence[Tuple[float, float]]],
              x_label: str, y_label: str) -> None:
    """One polyline (with markers) per series, a legend, and labelled axes."""
    font, small = _font(16), _font(13)
    width, height = 760, 480
    left, right, top, bottom = 80, 150, 50, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black", font=font)
    points = [p for values in series.values() for p in values]
    if not points:
        draw.text((left, top + 20), "no data", fill="black", font=font)
        image.save(path)
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ys), max(ys)
    pad = (y_high - y_low) * 0.05 or 0.5
    y_low, y_high = y_low - pad, y_high + pad
    x_high = x_high if x_high > x_low else x_low + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_pixel(x: float, y: float) -> Tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * plot_w,
                top + (1 - (y - y_low) / (y_high - y_low)) * plot_h)

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for y in _ticks(y_low, y_high):
        _, py = to_pixel(x_low, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.line([left, py, left + plot_w, py], fill=(230, 230, 230))
        label = f"{y:.2f}"
        tw, th = _text_size(draw, label, small)
        draw.text((left - tw - 8, py - th // 2), label, fill="black", font=small)
    for x in _ticks(x_low, x_high):
        px, _ = to_pixel(x, y_low)
        draw.line([px, top + plot_h, px, top + plot_h + 4], fill="black")
        label = f"{x:.0f}"
        tw, _ = _text_size(draw, label, small)
        draw.text((px - tw // 2, top + plot_h + 8), label, fill="black", font=small)
    draw.text((left + plot_w // 2 - 80, height - 26), x_label, fill="black", font=small)
    draw.text((10, top - 22), y_label, fill="black", font=small)
    for k, (name, values) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        pixels = [to_pixel(x, y) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        ly = top + 10 + 22 * k
        draw.line([left + plot_w + 15, ly + 7, left + plot_w + 40, ly + 7], fill=color, width=3)
        draw.text((left + plot_w + 46, ly), name, fill="black", font=small)
    image.save(path)


def bar_chart(path: str, title: str, categories: Sequence[str],
              series: Dict[str, Sequence[float]], y_label: str,
              notes: Sequence[str] = ()) -> None:
    """Grouped bars: one group per category, one bar per series (side by side, a legend).

    ``notes``: one short line under each category's label (e.g. a ratio), or nothing.
    """
    font, small = _font(16), _font(13)
    width = max(760, 90 + 70 * len(categories) * max(1, len(series)) // 2 + 170)
    height = 480
    left, right, top, bottom = 80, 170, 50, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black", font=font)
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([v for values in series.values() for v in values] + [0.0]) or 1.0
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for y in _ticks(0.0, peak):
        py = top + (1 - y / peak) * plot_h
        draw.line([left - 4, py, left, py], fill="black")
        draw.line([left, py, left + plot_w, py], fill=(230, 230, 230))
        label = f"{y:.3g}"
        tw, th = _text_size(draw, label, small)
        draw.text((left - tw - 8, py - th // 2), label, fill="black", font=small)
    draw.text((10, top - 22), y_label, fill="black", font=small)
    slot = plot_w / max(1, len(categories))
    bar = slot * 0.8 / max(1, len(series))
    for i, category in enumerate(categories):
        x0 = left + i * slot + slot * 0.1
        for k, values in enumerate(series.values()):
            h = plot_h * values[i] / peak
            draw.rectangle([x0 + k * bar, top + plot_h - h, x0 + (k + 1) * bar - 1, top + plot_h],
                           fill=PALETTE[k % len(PALETTE)])
        label = str(category)[:14]
        draw.text((x0, top + plot_h + 6), label, fill="black", font=small)
        if i < len(notes):
            draw.text((x0, top + plot_h + 24), notes[i], fill="black", font=small)
    for k, name in enumerate(series):
        ly = top + 10 + 22 * k
        draw.rectangle([left + plot_w + 15, ly, left + plot_w + 35, ly + 14],
                       fill=PALETTE[k % len(PALETTE)])
        draw.text((left + plot_w + 42, ly), name, fill="black", font=small)
    image.save(path)
