"""Small PNG charts drawn with Pillow (no plotting library needed): loss curves.

    line_chart({"stage 1": losses1, "stage 2": losses2}, "VDA losses").save("losses.png")

Each series is drawn in its own panel with its own y range (losses of
different stages differ by orders of magnitude), with a moving average over
the raw values so a trend is visible through per-step noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from vidalign.errors import InvalidInput

PANEL_W, PANEL_H = 420, 220
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 30, 28


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without sized default fonts
        return ImageFont.load_default()


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average fewer)."""
    if window < 1:
        raise InvalidInput(f"window: expected >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _panel(name: str, values: Sequence[float]) -> Image.Image:
    image = Image.new("RGB", (PANEL_W, PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    font = _font(12)
    draw.text((MARGIN_L, 8), f"{name} ({len(values)} steps)", fill="black", font=font)
    x0, x1 = MARGIN_L, PANEL_W - MARGIN_R
    y0, y1 = MARGIN_T, PANEL_H - MARGIN_B
    draw.rectangle([x0, y0, x1, y1], outline="gray")
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    for frac in (0.0, 0.5, 1.0):
        value = hi - frac * (hi - lo)
        y = y0 + frac * (y1 - y0)
        draw.text((4, y - 6), f"{value:.4g}", fill="black", font=font)
    draw.text((x0, y1 + 6), "1", fill="black", font=font)
    draw.text((x1 - 24, y1 + 6), str(len(values)), fill="black", font=font)

    def point(i: int, v: float) -> tuple[float, float]:
        x = x0 + (i / max(1, len(values) - 1)) * (x1 - x0)
        return x, y1 - (v - lo) / (hi - lo) * (y1 - y0)

    raw = [point(i, v) for i, v in enumerate(values)]
    smooth = [point(i, v) for i, v in enumerate(moving_average(values, max(1, len(values) // 10)))]
    if len(raw) > 1:
        draw.line(raw, fill=(170, 190, 230), width=1)
        draw.line(smooth, fill=(20, 60, 200), width=2)
    else:
        draw.ellipse([raw[0][0] - 2, raw[0][1] - 2, raw[0][0] + 2, raw[0][1] + 2], fill="blue")
    return image


def line_chart(series: Mapping[str, Sequence[float]], title: str, *, columns: int = 2) -> Image.Image:
    """One panel per non-empty series, ``columns`` per row, under ``title``."""
    panels = [_panel(name, list(values)) for name, values in series.items() if len(values)]
    if not panels:
        raise InvalidInput(f"{title}: no series with values to draw")
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    image = Image.new("RGB", (columns * PANEL_W, rows * PANEL_H + 28), "white")
    ImageDraw.Draw(image).text((8, 6), title, fill="black", font=_font(16))
    for k, panel in enumerate(panels):
        image.paste(panel, ((k % columns) * PANEL_W, 28 + (k // columns) * PANEL_H))
    return image
