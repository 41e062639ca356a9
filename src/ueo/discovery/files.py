"""The files of a discovery: clusters.csv, clusters.md, a contact sheet per cluster and
discover.json, each written atomically; and the table the command line prints."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ueo import images as image_files
from ueo.discovery.groups import TOP_NAMES, Discovery
from ueo.files import atomic_write, write_json, write_text

CSV_FILE = "clusters.csv"
MD_FILE = "clusters.md"
JSON_FILE = "discover.json"
SHEETS = "sheets"
CSV_FIELDS = ("image", "cluster", "name", "distance")
SHEET_IMAGES = 16  # the images nearest each centroid
SHEET_COLUMNS = 4
TILE = 96  # pixels


def write_discovery(out: str | os.PathLike, found: Discovery, record: dict) -> dict[str, Path]:
    """Write the four kinds of file into `out`; `record` (what discover.json holds besides the
    discovery itself) says how it was made."""
    out = Path(out)
    files = {
        "csv": write_text(out / CSV_FILE, clusters_csv(found)),
        "md": write_text(out / MD_FILE, clusters_markdown(found, record)),
    }
    for cluster in found.clusters:
        files[f"sheet{cluster.id}"] = write_sheet(
            out / SHEETS / f"cluster-{cluster.id:02d}.png", found, cluster.id
        )
    files["json"] = write_json(out / JSON_FILE, {**record, **found.summary()})
    return files


def clusters_csv(found: Discovery) -> str:
    """One row per rejected image, by cluster, nearest its centroid first."""
    names = {c.id: c.name or "" for c in found.clusters}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    order = np.lexsort((found.distance, found.cluster))  # by cluster, then distance
    rows = zip(order.tolist(), found.cluster[order].tolist(), found.distance[order], strict=True)
    for i, c, d in rows:
        writer.writerow([found.paths[i], c, names[c], f"{d:.6f}"])
    return buf.getvalue()


def _names(cluster) -> str:
    return ", ".join(f"{n} {share:.0%}" for n, share in cluster.top_names if share > 0) or "-"


def discovery_table(found: Discovery) -> str:
    """The terminal's table: one line per cluster."""
    if not found.clusters:
        return f"No image was rejected (threshold {found.counts['threshold']:.6g}): no groups."
    width = max(6, *(len(c.name or "-") for c in found.clusters))
    lines = [
        f"{'cluster':>7} {'images':>6}  {'name':<{width}} {'tight':>5}  "
        f"{'nearest known (cos)':<22} top names (share of votes)"
    ]
    for c in found.clusters:
        known = f"{c.nearest_known} ({c.known_cos:.2f}){' *' if c.likely_known else ''}"
        lines.append(
            f"{c.id:>7} {c.size:>6}  {c.name or '-':<{width}} {c.tightness:>5.2f}  "
            f"{known:<22} {_names(c)}"
        )
    likely = sum(c.likely_known for c in found.clusters)
    lines.append(
        f"{found.counts['rejected']} of {found.counts['readable']} images rejected "
        f"(threshold {found.counts['threshold']:.6g}), {found.k} clusters ({_rule(found)})"
        + (f"; * {likely} look like a known class" if likely else "")
    )
    return "\n".join(lines)


def _rule(found: Discovery) -> str:
    s = found.selection
    if s["rule"] in ("silhouette", "gcd"):
        return f"k chosen by {s['rule']}"
    return "k fixed" if s["rule"] == "fixed" else s.get("reason", "")


def clusters_markdown(found: Discovery, record: dict) -> str:
    """Each cluster: size, name, top names and their shares, tightness, nearest known class;
    then the score against k that chose the number of clusters."""
    c = found.counts
    vocab = record.get("vocabulary", {})
    lines = [
        "# ueo discover",
        "",
        f"{c['rejected']} of {c['readable']} readable images ({c['images']} listed) scored "
        f"below the threshold {c['threshold']:.6g} and were grouped; names come from "
        f"{vocab.get('size', len(found.vocabulary))} vocabulary names "
        f"({vocab.get('source', 'given')}), the known classes left out.",
        "",
    ]
    if not found.clusters:
        return "\n".join([*lines, "No image was rejected: there is nothing to group.", ""])
    lines += [
        f"| cluster | images | name | top {TOP_NAMES} names (share of votes) | tightness "
        "| nearest known class (cos) | likely known |",
        "|---:|---:|---|---|---:|---|---|",
    ]
    for cl in found.clusters:
        lines.append(
            f"| {cl.id} | {cl.size} | {cl.name or '-'} | {_names(cl)} | {cl.tightness:.3f} "
            f"| {cl.nearest_known} ({cl.known_cos:.3f}) | "
            f"{'yes' if cl.likely_known else 'no'} ({cl.known_share:.0%}) |"
        )
    lines += [
        "",
        "tightness: mean cosine of a cluster's images to its centroid (1 = identical images). "
        "likely known: whether a known class would get the most votes if the known classes "
        "were names too (in brackets, the share of its images nearer a known class than any "
        "vocabulary name), for known-class images rejected by mistake. A name is `-` when "
        "there are more clusters than names. Contact sheets: "
        f"`{SHEETS}/cluster-NN.png` ({SHEET_IMAGES} images nearest the centroid).",
        "",
    ]
    s = found.selection
    if s["scores"]:
        what = {
            "silhouette": "silhouette score of the k-means clustering of the rejected images",
            "gcd": f"cluster accuracy on {s.get('labelled')} confident known-class images "
            f"({s.get('labelled_classes')} classes) clustered with the rejected ones",
        }[s["rule"]]
        lines += [
            f"## Number of clusters: {s['k']} ({s['rule']})",
            "",
            f"Chosen on {s['sampled']} rejected images by the {what}:",
            "",
            "| k | score |",
            "|---:|---:|",
            *(
                f"| {e['k']}{' (chosen)' if e['k'] == s['k'] else ''} | {e['score']:.4f} |"
                for e in s["scores"]
            ),
            "",
        ]
    else:
        lines += [f"Number of clusters: {found.k} ({_rule(found)}).", ""]
    return "\n".join(lines)


def write_sheet(path: Path, found: Discovery, cluster: int) -> Path:
    """A grid of the cluster's images nearest its centroid, under a title line."""
    members = np.flatnonzero(found.cluster == cluster)
    members = members[np.argsort(found.distance[members], kind="stable")][:SHEET_IMAGES].tolist()
    info = next(c for c in found.clusters if c.id == cluster)
    rows = -(-len(members) // SHEET_COLUMNS)
    title = 16
    columns = min(SHEET_COLUMNS, len(members))
    sheet = Image.new("RGB", (max(columns * TILE, 4 * TILE), title + rows * TILE), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), f"cluster {cluster}: {info.name or '-'} ({info.size} images)", fill="black")
    for n, i in enumerate(members):
        try:
            tile = ImageOps.pad(image_files.open_rgb(found.paths[i]), (TILE, TILE), color="white")
        except (OSError, ValueError, SyntaxError):  # what ImageDataset counts as unreadable
            tile = Image.new("RGB", (TILE, TILE), "gray")
        sheet.paste(tile, ((n % SHEET_COLUMNS) * TILE, title + (n // SHEET_COLUMNS) * TILE))
    with atomic_write(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
