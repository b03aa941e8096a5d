"""A small terminal heatmap of a 2-D array: coloured cells with a scale, or characters.

With colour (Rich decides; NO_COLOR turns it off) each value is a two-character cell whose
background runs from dark (0) to bright (max). Without colour the cells are characters from
``RAMP``, light to dense, so the picture survives copy-paste and plain logs.
"""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.text import Text

RAMP = " .:-=+*#%@"
MAX_CELLS = 48  # larger arrays are shown by their max over blocks


def downsample(values: np.ndarray, limit: int = MAX_CELLS) -> np.ndarray:
    """Max-pool a 2-D array so that neither side exceeds ``limit`` cells."""
    rows, cols = values.shape
    fy, fx = -(-rows // limit), -(-cols // limit)
    if fy == fx == 1:
        return values
    padded = np.full((-(-rows // fy) * fy, -(-cols // fx) * fx), -np.inf)
    padded[:rows, :cols] = values
    return padded.reshape(padded.shape[0] // fy, fy, padded.shape[1] // fx, fx).max(axis=(1, 3))


def heatmap(values: np.ndarray, title: str, *, color: bool) -> Text:
    """Render ``values`` (2-D, non-negative; NaN shown as '?') as Rich Text."""
    values = downsample(np.asarray(values, dtype=np.float64))
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    levels = np.zeros(values.shape, dtype=int)
    if top > 0:
        levels = np.clip(np.nan_to_num(values / top, nan=0.0) * (len(RAMP) - 1), 0, len(RAMP) - 1)
        levels = np.rint(levels).astype(int)
    text = Text(f"{title}\n")
    for r, row in enumerate(levels):
        for c, level in enumerate(row):
            if np.isnan(values[r, c]):
                text.append("??")
            elif color:
                shade = int(40 + 215 * level / (len(RAMP) - 1))
                text.append("  ", style=f"on rgb({shade},{shade // 3},{0 if level else 40})")
            else:
                text.append(RAMP[level] * 2)
        text.append("\n")
    scale = "".join(RAMP) if not color else None
    if scale:
        text.append(f"scale: '{RAMP[0]}' = 0 … '{RAMP[-1]}' = {top:.3g}")
    else:
        text.append("scale: ")
        for level in range(len(RAMP)):
            shade = int(40 + 215 * level / (len(RAMP) - 1))
            text.append("  ", style=f"on rgb({shade},{shade // 3},{0 if level else 40})")
        text.append(f" 0 … {top:.3g}")
    return text


def print_heatmap(console: Console, values: np.ndarray, title: str) -> None:
    console.print(heatmap(values, title, color=console.color_system is not None))
