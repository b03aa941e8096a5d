"""A small terminal heatmap of a 2-D array: coloured cells with a scale, or characters.

With colour (Rich decides; NO_COLOR turns it off) each value is a two-character cell. Values
of one sign run from dark (0) to bright (the largest magnitude); signed data uses blue for
negative and red for positive. Without colour the cells are characters from ``RAMP``, light
to dense by magnitude (``-`` marks negative cells of signed data in the second character),
so the picture survives copy-paste and plain logs.
"""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.text import Text

RAMP = " .:;=+*#%@"
MAX_CELLS = 48  # larger arrays are shown by their extreme values over blocks


def downsample(values: np.ndarray, limit: int = MAX_CELLS) -> np.ndarray:
    """Shrink a 2-D array so neither side exceeds ``limit`` cells, keeping each block's
    value of largest magnitude (so a single wrong element stays visible)."""
    rows, cols = values.shape
    fy, fx = -(-rows // limit), -(-cols // limit)
    if fy == fx == 1:
        return values
    padded = np.zeros((-(-rows // fy) * fy, -(-cols // fx) * fx))
    padded[:rows, :cols] = values
    blocks = padded.reshape(padded.shape[0] // fy, fy, padded.shape[1] // fx, fx)
    blocks = blocks.transpose(0, 2, 1, 3).reshape(blocks.shape[0], blocks.shape[2], -1)
    pick = np.nanargmax(np.abs(np.nan_to_num(blocks, nan=np.inf)), axis=-1)
    return np.take_along_axis(blocks, pick[..., None], axis=-1)[..., 0]


def _style(level: int, negative: bool) -> str:
    shade = int(40 + 215 * level / (len(RAMP) - 1))
    if negative:
        return f"on rgb({shade // 4},{shade // 2},{shade})"
    return f"on rgb({shade},{shade // 3},{0 if level else 40})"


def heatmap(values: np.ndarray, title: str, *, color: bool) -> Text:
    """Render ``values`` (2-D; NaN shown as ``??``) as Rich Text with a title and a scale."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"a heatmap needs a 2-D array, got shape {values.shape}")
    values = downsample(values)
    finite = values[np.isfinite(values)]
    signed = bool(finite.size and finite.min() < 0)
    top = float(np.abs(finite).max()) if finite.size else 0.0
    levels = np.zeros(values.shape, dtype=int)
    if top > 0:
        scaled = np.nan_to_num(np.abs(values) / top, nan=0.0, posinf=1.0) * (len(RAMP) - 1)
        levels = np.rint(np.clip(scaled, 0, len(RAMP) - 1)).astype(int)
    text = Text(f"{title}\n")
    for r, row in enumerate(levels):
        for c, level in enumerate(row):
            value = values[r, c]
            if np.isnan(value):
                text.append("??")
            elif color:
                text.append("  ", style=_style(level, value < 0))
            else:
                text.append(RAMP[level] + ("-" if signed and value < 0 else RAMP[level]))
        text.append("\n")
    _append_scale(text, top, signed, color)
    return text


def _append_scale(text: Text, top: float, signed: bool, color: bool) -> None:
    if not color:
        sign = "; a '-' after a cell marks a negative value" if signed else ""
        text.append(f"scale: '{RAMP[0]}' = 0 … '{RAMP[-1]}' = {top:.3g} in magnitude{sign}")
        return
    text.append("scale: ")
    if signed:
        for level in range(len(RAMP) - 1, -1, -1):
            text.append(" ", style=_style(level, True))
        text.append(f" -{top:.3g} … 0 … ")
    else:
        text.append("0 … ")
    for level in range(len(RAMP)):
        text.append(" ", style=_style(level, False))
    text.append(f" {top:.3g}")


def print_heatmap(console: Console, values: np.ndarray, title: str) -> None:
    """Colour cells where the console shows colour; characters otherwise (NO_COLOR, files)."""
    colour = console.color_system is not None and not console.no_color
    console.print(heatmap(values, title, color=colour), soft_wrap=True)  # rows stay rows
