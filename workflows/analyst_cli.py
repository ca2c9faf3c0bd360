"""Analyst commands on a run's outputs: ``catalogue``, ``query``, ``preview``.

``register(app)`` adds them to a Typer app. Errors (missing output directory, unknown image or
class, bad bbox, …) exit with code 2 and one line on stderr naming the problem.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

# geopandas, matplotlib and rasterio load in the commands, not with the command line

console = Console()

OutArgument = Annotated[Path, typer.Argument(help="A run's output directory (one folder per image).")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _box(text: str | None, option: str) -> tuple[float, float, float, float] | None:
    """``x0,y0,x1,y1`` → four floats with x0 < x1 and y0 < y1."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not (values[0] < values[2] and values[1] < values[3] and all(map(math.isfinite, values))):
        _fail(f"{option} {text!r} must be x0,y0,x1,y1 (finite numbers) with x0 < x1 and y0 < y1")
    return values


def _finite(value: float | None, option: str) -> float | None:
    if value is not None and not math.isfinite(value):
        _fail(f"{option} {value} must be a finite number")
    return value


def _number(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.4g}"


def catalogue_command(out: OutArgument) -> None:
    """Build or refresh OUT/catalogue (GeoParquet, one partition per image; only changed images rewritten)."""
    from workflows.catalogue import CatalogueError, build_catalogue, read_images

    try:
        root = build_catalogue(out)
    except CatalogueError as err:
        _fail(str(err))
    images = read_images(root)
    console.print(f"catalogue: {root} ({len(images)} images, {sum(i['instances'] or 0 for i in images)} instances)")


def _instances_table(frames, limit: int) -> None:
    import pandas as pd
    import shapely

    from workflows.query import crs_label, ground_area

    rows = pd.concat([
        pd.DataFrame({
            "image": f["image_id"], "id": f["instance_id"], "class": f["class"], "score": f["score"], "area": ground_area(f),
            "x": shapely.get_x(shapely.point_on_surface(f.geometry.values)),
            "y": shapely.get_y(shapely.point_on_surface(f.geometry.values)),
            "crs": crs_label(f.crs),
        })
        for f in frames
    ] or [pd.DataFrame(columns=["image", "id", "class", "score", "area", "x", "y", "crs"])])
    table = Table(title="instances (x, y: a point inside each, in its image's CRS; area: m², px² in pixel space)")
    for column in rows.columns:
        table.add_column(column, justify="right" if column in {"id", "score", "area", "x", "y"} else "left")
    for row in rows.head(limit).itertuples(index=False):
        table.add_row(row.image, str(row.id), row[2], f"{row.score:.5f}", _number(row.area), f"{row.x:.10g}", f"{row.y:.10g}", row.crs)
    console.print(table)
    if len(rows) > limit:
        console.print(f"… {len(rows) - limit} more (use --limit or --output)")
    per_class = ", ".join(f"{name} {n}" for name, n in rows["class"].value_counts().sort_index().items())
    console.print(f"{len(rows)} instances" + (f": {per_class}" if per_class else ""))


def _regions_table(stats) -> None:
    import pandas as pd

    table = Table(title="instances per region")
    columns = [c for c in stats.columns if c != stats.geometry.name]
    for column in columns:
        table.add_column(column, justify="right" if pd.api.types.is_numeric_dtype(stats[column]) else "left")
    for row in stats[columns].itertuples(index=False):
        table.add_row(*(_number(v) if isinstance(v, float) else str(v) for v in row))
    console.print(table)


def query_command(
    out: OutArgument,
    bbox: Annotated[Optional[str], typer.Option(help="x0,y0,x1,y1 in --bbox-crs (default: each image's own coordinates).")] = None,
    bbox_crs: Annotated[Optional[str], typer.Option(help="CRS of --bbox (e.g. EPSG:4326), or 'pixels' for slides / unreferenced images.")] = None,
    classes: Annotated[Optional[list[str]], typer.Option("--class", help="Keep this class (repeat for several).")] = None,
    min_score: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Minimum score (0 to 1).")] = None,
    min_area: Annotated[Optional[float], typer.Option(help="Minimum area: m² on the ground for georeferenced images, px² in pixel space.")] = None,
    max_area: Annotated[Optional[float], typer.Option(help="Maximum area.")] = None,
    images: Annotated[Optional[list[str]], typer.Option("--image", help="Keep this image id (repeat for several).")] = None,
    within: Annotated[Optional[Path], typer.Option(help="Regions (GeoPackage, GeoJSON …): counts and statistics per region.")] = None,
    to_crs: Annotated[Optional[str], typer.Option(help="CRS of written geometries (needed when matches span CRSs).")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Write FILE.csv, .gpkg or .geojson instead of printing a table.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Rows printed in the table.")] = 20,
) -> None:
    """Instances of OUT by bounding box, class, score, area, image or region."""
    from workflows.catalogue import CatalogueError
    from workflows.query import QueryError, query, select, write_result

    box = _box(bbox, "--bbox")
    min_area, max_area = _finite(min_area, "--min-area"), _finite(max_area, "--max-area")  # typer refuses a NaN --min-score
    area_range = (min_area, max_area) if min_area is not None or max_area is not None else None
    try:
        if output is not None or within is not None:
            result = query(out, box, bbox_crs, classes, min_score, area_range, images, within, to_crs)
            if output is not None:
                write_result(result, output)
                console.print(f"{len(result)} rows → {output}")
            else:
                _regions_table(result)
        else:
            _instances_table(select(out, box, bbox_crs, classes, min_score, area_range, images), limit)
    except (CatalogueError, QueryError) as err:
        _fail(str(err))


def preview_command(
    out: OutArgument,
    image_id: Annotated[str, typer.Argument(help="Image id: its folder name in OUT.")],
    region: Annotated[Optional[str], typer.Option(help="x0,y0,x1,y1 in output coordinates (CRS, or pixels): full resolution.")] = None,
    density: Annotated[bool, typer.Option(help="A heatmap of instances per cell instead of the overlay.")] = False,
    cell_size: Annotated[Optional[int], typer.Option("--cell-size", "--density-cell", help="Density cell in the file's full-resolution pixels; default: the run's cell (labels.zarr), else 256.")] = None,
    max_size: Annotated[int, typer.Option(help="Longest side of the overlay in pixels.")] = 2048,
    output: Annotated[Optional[Path], typer.Option(help="PNG to write; default OUT/IMAGE_ID/preview.png (density.png).")] = None,
) -> None:
    """A picture of one image's instances: polygons coloured by class over the image, or their density."""
    from pipeline import preview
    from workflows.catalogue import find_output, unwritable

    box = _box(region, "--region")
    if (cell_size is not None and cell_size < 1) or max_size < 1:
        _fail("--cell-size and --max-size must be positive")
    if output is not None and output.suffix.lower() != ".png":
        _fail(f"--output {output}: previews are PNG files (.png)")
    try:
        found = find_output(out, image_id)
        png = output or found.folder / ("density.png" if density else "preview.png")
        source = _as_read(found)
        frame = found.instances()
        if density:
            side = found.density_cell_side()
            run_cell = round(side / abs(source.transform.a)) if side else None  # in this file's pixels
            preview.render_density(frame, *preview.image_grid(source), png, cell_size or run_cell or 256)
        else:
            preview.render_overlay(source, frame, png, box, max_size)
    except ValueError as err:  # CatalogueError, SourceError, a region outside the image
        _fail(str(err))
    except OSError as err:  # a read-only folder, a file in the way, a full disk
        _fail(f"{unwritable(png, err)}; give --output in a writable folder")
    console.print(f"preview: {png}")


def _as_read(output):
    """The image named in an output's ``counts.json`` opened as the run read it: its bands (slides:
    channels), their mapping to 8 bits and the µm per pixel it was given (older runs did not record these)."""
    from dataclasses import replace

    from pipeline.sources import open_image
    from workflows.catalogue import CatalogueError

    summary = output.summary()
    read = summary.get("read") or {}
    if not isinstance(summary.get("image"), str) or not isinstance(read, dict):
        raise CatalogueError(f"{output.counts_json}: names no image file (its 'image' or 'read' entry is missing or "
                             "malformed); run the image again to rewrite it")
    source = open_image(summary["image"], bands=tuple(read["bands"]) if read.get("bands") else None, mpp=read.get("mpp"))
    if Path(summary["image"]).stat().st_mtime_ns > output.counts_json.stat().st_mtime_ns:
        warnings.warn(f"{summary['image']}: changed since its results were written ({output.counts_json}): the "
                      "polygons may not fit the picture; run the image again", stacklevel=2)
    if read.get("value_range"):
        source = replace(source, value_range=tuple(tuple(pair) for pair in read["value_range"]))
    return source


def register(app: typer.Typer) -> None:
    """Add ``catalogue``, ``query`` and ``preview`` to ``app``."""
    app.command("catalogue")(catalogue_command)
    app.command("query")(query_command)
    app.command("preview")(preview_command)
