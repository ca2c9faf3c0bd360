"""Ground areas against pyproj's geodesic polygon areas, for one object in several CRSs."""

import numpy as np
import pyproj
import pytest
import shapely

from pipeline.ground_area import ground_area_m2

UTM = pyproj.CRS.from_epsg(32631)


@pytest.mark.parametrize("crs", ["EPSG:32631", "EPSG:4326", "EPSG:3857", "EPSG:32723", "EPSG:3035",
                                 "EPSG:27572", "EPSG:4807",  # NTF: lon/lat in grads (areas were 10 % too large)
                                 "+proj=tmerc +lat_0=40 +lon_0=0 +k=0.9 +x_0=0 +y_0=0 +ellps=GRS80 +units=ft"])
def test_ground_area_equals_the_geodesic_area_in_any_crs(crs):
    crs = pyproj.CRS.from_user_input(crs)
    shapes = [shapely.box(448000, 5411000, 448100, 5411100), shapely.Point(448500, 5411500).buffer(7)]  # near Paris
    lon_lat = pyproj.Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    there = pyproj.Transformer.from_crs(UTM, crs, always_xy=True)
    geod = pyproj.Geod(ellps="WGS84")
    for shape in shapes:
        dense = shapely.segmentize(shape, 2)
        truth = abs(geod.geometry_area_perimeter(shapely.transform(dense, lambda c: np.column_stack(lon_lat.transform(*c.T))))[0])
        moved = shapely.transform(dense, lambda c: np.column_stack(there.transform(*c.T)))
        assert ground_area_m2(np.array([moved]), crs.to_wkt())[0] == pytest.approx(truth, rel=1e-4)


def test_no_ground_area_without_a_crs_on_the_earth():
    engineering = 'ENGCRS["site grid",EDATUM["site"],CS[Cartesian,2],AXIS["x",east,LENGTHUNIT["metre",1]],AXIS["y",north,LENGTHUNIT["metre",1]]]'
    assert ground_area_m2(np.array([shapely.box(0, 0, 1, 1)]), None) is None
    assert ground_area_m2(np.array([shapely.box(0, 0, 1, 1)]), engineering) is None
