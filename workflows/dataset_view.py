"""``seamline dataset stats`` as tables for a terminal (``--json`` prints the numbers themselves)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Column, Table
from rich.text import Text

PERCENTILES = ("min", "p5", "median", "p95", "max")


def stats_view(stats: dict) -> Group:
    """Counts per class, object sizes and pixel sizes of ``pipeline.annotations.dataset_stats``,
    with what needs a look before training said in words under them."""
    summary = Text(
        f"{stats['images']} images, {stats['instances']:,} instances, "
        f"{stats['instances_per_megapixel']:,.1f} per megapixel"
    )
    classes = Table("class", _number("instances"), _number("share"), title="instances per class", title_justify="left")
    for name, count in stats["per_class"].items():
        classes.add_row(name, f"{count:,}", f"{stats['class_fraction'][name]:.1%}")
    sizes = Table("", *map(_number, PERCENTILES), title="object sizes", title_justify="left")
    _add_percentiles(sizes, "area (px²)", stats["area_px"], "{:,.0f}")
    _add_percentiles(sizes, "equivalent diameter (px)", stats["equivalent_diameter_px"], "{:,.1f}")
    for unit, values in stats["resolution"]["per_unit"].items():
        _add_percentiles(sizes, f"pixel size ({unit})", values, "{:.4g}")
    return Group(summary, classes, sizes, *_notes(stats))


def _number(header: str) -> Column:
    return Column(header, justify="right")


def _add_percentiles(table: Table, label: str, values: dict, number: str) -> None:
    if values:
        table.add_row(label, *(number.format(values[k]) for k in PERCENTILES))


def _notes(stats: dict) -> list[Text]:
    notes = []
    if stats["imbalanced"]:
        notes.append("classes imbalanced: the largest has over 10× the instances of the smallest")
    if stats["resolution"]["mixed"]:
        notes.append("pixel sizes differ by more than 5 %: `seamline train --resolution` puts them on one scale")
    for what, names in (
        ("without instances", stats["images_without_instances"]),
        ("without a pixel size", stats["resolution"]["images_without"]),
    ):
        if names:
            notes.append(f"{len(names)} image(s) {what}: {', '.join(names)}")
    return [Text(f"note: {n}", style="yellow") for n in notes]
