"""Pattern image files in and out.

Out: PNG pictures of diffraction patterns that a scientist can read, with a
reciprocal-space scale in Å⁻¹ on every pattern (axes and a scale bar where the picture is a
figure, a PNG text field where the pixels are data, as for ``xtalsym shape``).
In: a raw DP from a ``.npy`` array or an image file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SCALE_KEY = "xtalsym:reciprocal_scale"
NICE_LENGTHS_A = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def scale_text(q_per_pixel: float) -> str:
    return f"{q_per_pixel:.6g} 1/Angstrom per pixel (reciprocal space, beam at the image centre)"


def png_info(q_per_pixel: float, *, note: str = ""):
    """PNG text fields carrying the scale (PIL's PngInfo)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(SCALE_KEY, scale_text(q_per_pixel))
    info.add_text("Description", scale_text(q_per_pixel) + (f"; {note}" if note else ""))
    return info


def bar_length(q_per_pixel: float, pixels: int) -> float:
    """A round bar length (Å⁻¹) about a fifth of the picture's width."""
    target = 0.2 * pixels * q_per_pixel
    fitting = [v for v in NICE_LENGTHS_A if v <= target]
    return fitting[-1] if fitting else NICE_LENGTHS_A[0]


def add_scale_bar(ax, q_per_pixel: float, pixels: int, *, color: str = "white", fontsize: float = 6) -> None:
    """A horizontal bar of :func:`bar_length` Å⁻¹ in the lower left of an imshow axis."""
    length = bar_length(q_per_pixel, pixels)
    px = length / q_per_pixel
    x0, y0 = 0.06 * pixels, 0.92 * pixels
    ax.plot([x0, x0 + px], [y0, y0], color=color, linewidth=2, solid_capstyle="butt")
    ax.text(
        x0 + px / 2, y0 - 0.03 * pixels, f"{length:g} Å⁻¹", color=color, fontsize=fontsize, ha="center", va="bottom"
    )


def save_pattern_png(intensity: np.ndarray, path: str | Path, *, q_per_pixel: float, title: str = "") -> Path:
    """A simulated pattern as a figure: square-root stretch (weak spots visible), axes in
    Å⁻¹ from the beam, a scale bar; the scale also as a PNG text field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.asarray(intensity, dtype=np.float64)
    peak = float(image.max()) or 1.0
    n_y, n_x = image.shape
    half_x, half_y = n_x * q_per_pixel / 2, n_y * q_per_pixel / 2
    fig, ax = plt.subplots(figsize=(5.4, 5))
    shown = ax.imshow(
        np.sqrt(np.clip(image, 0, None) / peak), cmap="gray", vmin=0, vmax=1, extent=(-half_x, half_x, half_y, -half_y)
    )
    ax.set_xlabel("q_x (Å⁻¹)")
    ax.set_ylabel("q_y (Å⁻¹)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(shown, ax=ax, label="sqrt(I / I_max)", shrink=0.8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={SCALE_KEY: scale_text(q_per_pixel)})
    plt.close(fig)
    return path


def read_raw_image(path: str | Path) -> np.ndarray:
    """A raw DP from .npy (any numeric dtype) or an image file (converted to grey)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"raw image not found: {path}")
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"cannot read {path} as a numeric .npy array: {exc}") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L") if image.mode not in ("L", "I;16", "I", "F") else image)
    except UnidentifiedImageError:
        raise ValueError(f"not an image or .npy file: {path}") from None


def save_shaped_png(shaped: np.ndarray, path: str | Path, *, q_per_pixel: float, note: str = "") -> Path:
    """A shaped DP exactly as the model sees it (pixels untouched), its scale in the PNG text."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(shaped).save(path, pnginfo=png_info(q_per_pixel, note=note))
    return path
