"""Evidence for people: a text block for the CLI and an overlay of the indexed lattice on a DP."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xtalsym.evidence.frame import FrameEvidence
from xtalsym.evidence.sample import SampleEvidence


def _cell_text(cell, sigma) -> str:
    a, b, c, al, be, ga = cell
    sa, sb, sc, sal, sbe, sga = sigma if sigma else (0,) * 6

    def pm(v, s, unit, digits):
        return f"{v:.{digits}f}{unit}" + (f" ± {s:.{digits}f}" if s else "")
    return (f"a = {pm(a, sa, ' Å', 3)}, b = {pm(b, sb, ' Å', 3)}, c = {pm(c, sc, ' Å', 3)}, "
            f"α = {pm(al, sal, '°', 2)}, β = {pm(be, sbe, '°', 2)}, γ = {pm(ga, sga, '°', 2)}")


def format_text(ev: SampleEvidence) -> str:
    """What `xtalsym predict` prints: cell, Bravais lattice, absences and symmetry per zone, warnings."""
    lines = ["symmetry evidence (measured in the three zone-axis patterns):"]
    if ev.cell is not None:
        lines.append(f"  cell ({ev.metric_class}, apparent): {_cell_text(ev.cell, ev.cell_sigma)}")
    else:
        lines.append("  cell: not determined")
    system_p = ev.probabilities("system")
    bravais_p = ev.probabilities("bravais")
    top_b = sorted(bravais_p.items(), key=lambda kv: -kv[1])[:4]
    top_s = sorted(system_p.items(), key=lambda kv: -kv[1])[:3]
    lines.append(f"  crystal system: {ev.crystal_system or 'not decided'}   ("
                 + ", ".join(f"{k} {100 * v:.1f}%" for k, v in top_s) + ")")
    lines.append(f"  Bravais lattice: {ev.bravais or 'not decided'}   ("
                 + ", ".join(f"{k} {100 * v:.1f}%" for k, v in top_b) + ")")
    for name, cell in ev.cell_by_bravais.items():
        if bravais_p.get(name, 0) >= 0.01:
            lines.append(f"    {name}: a = {cell[0]:.3f} Å, b = {cell[1]:.3f} Å, c = {cell[2]:.3f} Å")
    for axis in sorted(ev.zones):
        f = ev.zones[axis]
        if not f.decided:
            lines.append(f"  zone {axis}: cannot decide: {f.reason}")
            continue
        lengths = 1.0 / np.linalg.norm(f.basis, axis=1)
        absent = [k for k, v in f.conditions.items() if v["verdict"] == "absent" and not k.startswith("half")]
        sym = [k for k, v in f.symmetry.items() if v["verdict"] == "symmetric"]
        lines.append(f"  zone {axis}: {f.n_spots} spots, {int(f.spots_indexed.sum())} indexed (rms {f.rms_px:.2f} px), "
                     f"lattice d = {lengths[0]:.3f} / {lengths[1]:.3f} Å, orders up to {f.max_order}, "
                     f"2D symmetry {f.point_group_2d}" + (f" ({', '.join(sym)})" if sym else ""))
        lines.append(f"          absences: {', '.join(absent) if absent else 'none found on the lattice of the spots'}")
    top = ev.top_groups(8)
    near = [g for g in top if g["log_likelihood"] >= -5]
    if ev.cell is not None:
        lines.append("  groups the evidence cannot tell apart from the best: "
                     + ", ".join(f"{g['space_group']} {g['symbol']}" for g in near))
    for w in ev.warnings:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def draw_overlay(image: np.ndarray, frame: FrameEvidence, out: str | Path, *, title: str = "") -> Path:
    """PNG of ``image`` (the raw DP, any scale) with the indexed spots, the lattice nodes and
    the spots' indices (m, n) on the frame's reduced basis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img = np.asarray(image, float)
    cy, cx = (img.shape[0] - 1) / 2, (img.shape[1] - 1) / 2
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(np.sqrt(np.clip(img, 0, None)), cmap="gray", origin="upper")
    if frame.decided and frame.basis is not None:
        basis_px = frame.basis / frame.q_per_pixel
        h = frame.nodes_half
        integer = np.all(h % 2 == 0, axis=1)
        pos = (h[integer] / 2.0) @ basis_px
        ax.scatter(pos[:, 0] + cx, pos[:, 1] + cy, s=12, facecolors="none", edgecolors="tab:blue", linewidths=0.6)
        ok = frame.spots_indexed
        ax.scatter(frame.spots_x_px[ok] + cx, frame.spots_y_px[ok] + cy, s=40, facecolors="none",
                   edgecolors="yellow", linewidths=0.9)
        ax.scatter(frame.spots_x_px[~ok] + cx, frame.spots_y_px[~ok] + cy, s=40, marker="x", color="red",
                   linewidths=0.9)
        for (m, n), x, y in zip(frame.spots_index[ok], frame.spots_x_px[ok], frame.spots_y_px[ok]):
            ax.annotate(f"{m},{n}", (x + cx, y + cy), xytext=(4, 4), textcoords="offset points", color="yellow",
                        fontsize=6)
        for vec, name in zip(basis_px, "uv"):
            ax.annotate("", xy=(cx + vec[0], cy + vec[1]), xytext=(cx, cy),
                        arrowprops=dict(arrowstyle="->", color="cyan", lw=1))
            ax.text(cx + vec[0], cy + vec[1], name, color="cyan", fontsize=9)
        ax.set_title(title or f"zone {frame.axis}: {int(ok.sum())} indexed spots, 2D symmetry {frame.point_group_2d}",
                     fontsize=9)
    else:
        ax.set_title(title or f"zone {frame.axis}: cannot decide: {frame.reason}", fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
