"""Ground areas in m² of polygons in any georeferenced CRS.

A CRS's planar area is in its own units (deg² in lon/lat, inflated 1/cos²(lat) in Web Mercator).
Each polygon's area is scaled by the CRS's local area scale on the ellipsoid, measured at the
polygon's centre over a step of its own size: exact to the variation of that scale across one
object, far below a pixel's worth for the objects segmented here.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pyproj
import shapely


@cache
def _geodetic(crs_wkt: str) -> tuple[pyproj.Transformer, float, float, float] | None:
    """Transformer to the CRS's own lon/lat, degrees per unit of that lon/lat (grads: 0.9, as in
    the old French NTF grids), the ellipsoid's semi-major axis (m) and e²; None for a CRS not tied
    to the Earth (an engineering CRS)."""
    crs = pyproj.CRS.from_user_input(crs_wkt)
    geodetic = crs.geodetic_crs
    if geodetic is None or geodetic.ellipsoid is None:
        return None
    ellipsoid = geodetic.ellipsoid
    flattening = 1 / ellipsoid.inverse_flattening if ellipsoid.inverse_flattening else 0.0
    transformer = pyproj.Transformer.from_crs(crs, geodetic, always_xy=True)
    degrees = np.degrees(geodetic.axis_info[0].unit_conversion_factor)  # radians per unit, as degrees
    return transformer, float(degrees), ellipsoid.semi_major_metre, flattening * (2 - flattening)


def lon_lat_degrees(crs_wkt: str, x, y) -> tuple[np.ndarray, np.ndarray] | None:
    """Longitudes and latitudes in degrees, on the CRS's own datum and prime meridian, of points in
    ``crs_wkt``; None for a CRS not tied to the Earth."""
    geodetic = _geodetic(crs_wkt)
    if geodetic is None:
        return None
    transformer, degrees = geodetic[:2]
    lon, lat = transformer.transform(np.asarray(x, float), np.asarray(y, float))
    return np.asarray(lon) * degrees, np.asarray(lat) * degrees


def ground_area_m2(geometry: np.ndarray, crs_wkt: str | None) -> np.ndarray | None:
    """Area in m² on the ellipsoid of each polygon (coordinates in ``crs_wkt``); None without a
    CRS on the Earth."""
    geodetic = _geodetic(crs_wkt) if crs_wkt else None
    if geodetic is None:
        return None
    _, _, a, e2 = geodetic
    x0, y0, x1, y1 = shapely.bounds(geometry).T
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    step = np.maximum(np.maximum(x1 - x0, y1 - y0), 1e-9)
    lon, lat = lon_lat_degrees(crs_wkt, np.concatenate([cx, cx + step, cx]), np.concatenate([cy, cy, cy + step]))
    lon, lat = np.reshape(lon, (3, -1)), np.reshape(lat, (3, -1))
    phi = np.radians(lat[0])
    w = 1 - e2 * np.sin(phi) ** 2
    east = a / np.sqrt(w) * np.cos(phi)  # metres per radian of longitude, then of latitude
    north = a * (1 - e2) / w**1.5
    d_lon = np.radians((lon[1:] - lon[0] + 180) % 360 - 180)
    d_lat = np.radians(lat[1:] - lat[0])
    ground = np.abs(d_lon[0] * east * d_lat[1] * north - d_lon[1] * east * d_lat[0] * north)
    return shapely.area(geometry) * ground / step**2
