"""Resolving µm/px from slide properties, in order, and the per-slide overrides of an mpp CSV."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from slide_data import TCGA, TCGA_MPP_ESTIMATE

from shared.errors import ConfigError, SlideError
from shared.slides import open_slide
from shared.slides.resolution import MppTable, parse_mpp_cell, resolve_mpp

SLIDE = Path("/archive/case-7/scan.svs")

OME_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
    '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="10" SizeY="10" '
    'SizeC="3" SizeZ="1" SizeT="1" PhysicalSizeX="{size}"{unit}/></Image></OME>'
)


def ome_description(size: str, unit: str | None = None) -> str:
    return OME_XML.format(size=size, unit="" if unit is None else f' PhysicalSizeXUnit="{unit}"')


@pytest.mark.parametrize(
    ("properties", "expected_mpp"),
    [
        ({"openslide.mpp-x": "0.2527", "openslide.vendor": "aperio"}, 0.2527),
        ({"aperio.MPP": "0.4990"}, 0.499),
        ({"mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X": "0.243"}, 0.243),
        ({"philips.DICOM_PIXEL_SPACING": '"0.000227" "0.000226"'}, 0.226),
        ({"ventana.ScanRes": "0.465"}, 0.465),
        ({"sakura.ResolutionMmPerPix": "0.00025"}, 0.25),
        ({"zeiss.Scaling.Items.X.Value": "2.2e-07"}, 0.22),
        ({"hamamatsu.PhysicalWidth": "22700000", "openslide.level[0].width": "50000"}, 0.454),
        ({"tiffslide.mpp-x": 0.5, "tiffslide.vendor": "aperio"}, 0.5),
        ({"tiff.ImageDescription": ome_description("0.325")}, 0.325),
        ({"tiff.ImageDescription": ome_description("250", "nm")}, 0.25),
        ({"tiff.ImageDescription": ome_description("0.5", "\u00b5m")}, 0.5),
    ],
    ids=[
        "openslide", "aperio", "mirax", "philips", "ventana", "sakura", "zeiss", "hamamatsu-vms", "tiffslide",
        "ome-default-unit", "ome-nm", "ome-micro-sign",
    ],
)
def test_metadata_keys(properties: dict, expected_mpp: float) -> None:
    mpp, source = resolve_mpp(properties, path=SLIDE)

    assert mpp == pytest.approx(expected_mpp)
    assert source == "metadata"


@pytest.mark.parametrize(
    ("properties", "expected_mpp"),
    [
        ({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"}, 0.5),
        ({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}, 0.25),
        ({"tiff.XResolution": 40000.0, "tiff.ResolutionUnit": "CENTIMETER", "tiffslide.mpp-x": 0.25}, 0.25),
        (
            {
                "openslide.vendor": "generic-tiff",
                "openslide.mpp-x": "0.5",
                "tiff.XResolution": "20000",
                "tiff.ResolutionUnit": "centimeter",
            },
            0.5,
        ),
    ],
    ids=["centimeter", "inch", "tiffslide-restated", "openslide-restated"],
)
def test_tiff_resolution_tags(properties: dict, expected_mpp: float) -> None:
    mpp, source = resolve_mpp(properties, path=SLIDE)

    assert mpp == pytest.approx(expected_mpp)
    assert source == "tiff-resolution"


@pytest.mark.parametrize(
    ("key", "value", "expected_mpp"),
    [
        ("openslide.objective-power", "20", 0.5),
        ("aperio.AppMag", "40", 0.25),
        ("hamamatsu.SourceLens", "20", 0.5),
        ("leica.objective", "10", 1.0),
        ("mirax.GENERAL.OBJECTIVE_MAGNIFICATION", "20", 0.5),
        ("ventana.Magnification", "40", 0.25),
        ("tiffslide.objective-power", 20, 0.5),
        ("aperio.AppMag", "20x", 0.5),
    ],
)
def test_objective_power_fallback(
    key: str, value: str, expected_mpp: float, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="shared.slides.resolution"):
        mpp, source = resolve_mpp({key: value}, path=SLIDE)

    assert mpp == pytest.approx(expected_mpp)
    assert source == "objective-power"
    assert len(caplog.records) == 1
    warning = caplog.messages[0]
    assert str(SLIDE) in warning
    assert f"objective power in {key}" in warning
    assert "--mpp " in warning
    assert "--mpp-csv" in warning


def test_openslide_key_wins_over_vendor_key() -> None:
    properties = {"openslide.mpp-x": "0.25", "aperio.MPP": "0.5", "aperio.AppMag": "20"}

    assert resolve_mpp(properties, path=SLIDE) == (0.25, "metadata")


def test_metadata_wins_over_tiff_tags() -> None:
    properties = {"aperio.MPP": "0.25", "tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"}

    assert resolve_mpp(properties, path=SLIDE) == (0.25, "metadata")


def test_tiff_tags_win_over_objective_power(caplog: pytest.LogCaptureFixture) -> None:
    properties = {"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter", "aperio.AppMag": "20"}

    with caplog.at_level(logging.WARNING):
        result = resolve_mpp(properties, path=SLIDE)

    assert result == (0.25, "tiff-resolution")
    assert caplog.records == []


def test_override_wins_over_everything() -> None:
    properties = {"openslide.mpp-x": "0.25", "tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"}

    assert resolve_mpp(properties, path=SLIDE, override=0.3) == (0.3, "override")


@pytest.mark.parametrize(
    ("properties", "stated", "value"),
    [
        ({"openslide.mpp-x": "n/a", "ventana.ScanRes": "0.465"}, "'n/a' in openslide.mpp-x, which is not a number", "n/a"),
        ({"aperio.MPP": "0", "aperio.AppMag": "20"}, "a resolution of 0 µm/px in aperio.MPP", 0.0),
        ({"aperio.MPP": "-1", "ventana.ScanRes": "0.465"}, "a resolution of -1 µm/px in aperio.MPP", -1.0),
        ({"aperio.MPP": "nan", "tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"},
         "a resolution of nan µm/px in aperio.MPP", "nan"),
        ({"aperio.MPP": "inf"}, "a resolution of inf µm/px in aperio.MPP", "inf"),
        ({"aperio.MPP": "abc", "aperio.AppMag": "20"}, "'abc' in aperio.MPP, which is not a number", "abc"),
        ({"tiffslide.mpp-x": float("nan"), "tiffslide.objective-power": 20},
         "a resolution of nan µm/px in tiffslide.mpp-x", "nan"),
        ({"hamamatsu.PhysicalWidth": "0", "openslide.level[0].width": "50000"},
         "a resolution of 0 µm/px in hamamatsu.PhysicalWidth (0 nm over 50000 px)", 0.0),
        ({"tiff.ImageDescription": ome_description("0")}, "a resolution of 0 µm/px in OME-XML PhysicalSizeX (0 µm)", 0.0),
        ({"tiff.ImageDescription": ome_description("-1")}, "a resolution of -1 µm/px in OME-XML PhysicalSizeX", -1.0),
        ({"tiff.ImageDescription": ome_description("NaN")}, "a resolution of nan µm/px in OME-XML PhysicalSizeX", "NaN"),
        ({"tiff.ImageDescription": ome_description("0.5", "furlong")},
         "'0.5' in OME-XML PhysicalSizeX, in the unit 'furlong', which is not one of", "0.5"),
        ({"tiff.XResolution": "0", "tiff.ResolutionUnit": "centimeter", "aperio.AppMag": "20"},
         "a resolution of inf µm/px in tiff.XResolution (0 pixels per centimeter)", "0"),
        ({"tiff.XResolution": "1/0", "tiff.ResolutionUnit": "centimeter"},
         "a resolution of 0 µm/px in tiff.XResolution (1/0 pixels per centimeter)", 0.0),
        ({"tiff.XResolution": "0/0", "tiff.ResolutionUnit": "inch"},
         "a resolution of nan µm/px in tiff.XResolution (0/0 pixels per inch)", "0/0"),
        ({"aperio.AppMag": "0"}, "a resolution of inf µm/px in aperio.AppMag (objective power 0x)", "0"),
        ({"aperio.AppMag": "-20"}, "a resolution of -0.5 µm/px in aperio.AppMag (objective power -20x)", -0.5),
        ({"aperio.AppMag": "twenty"}, "'twenty' in aperio.AppMag, which is not a number",
         "twenty"),
        ({"tiff.ImageDescription": '<OME><Objective NominalMagnification="0"/></OME>'},
         "a resolution of inf µm/px in OME-XML NominalMagnification (objective power 0x)", "0"),
    ],
    ids=[
        "openslide-text", "aperio-zero", "aperio-negative", "aperio-nan-before-tags", "aperio-inf", "aperio-text",
        "tiffslide-nan", "hamamatsu-zero", "ome-zero", "ome-negative", "ome-nan", "ome-unknown-unit",
        "tiff-zero", "tiff-one-over-zero", "tiff-zero-over-zero", "power-zero", "power-negative", "power-text",
        "ome-power-zero",
    ],
)
def test_present_unusable_value_is_implausible(properties: dict, stated: str, value: float | str) -> None:
    with pytest.raises(SlideError) as raised:
        resolve_mpp(properties, path=SLIDE)

    message = str(raised.value)
    assert raised.value.reason == "implausible_resolution"
    assert message.startswith(f"slide {SLIDE} reports {stated}")
    assert "0.05-20.0 µm/px" in message
    assert "--mpp-csv" in message
    assert raised.value.value == value


@pytest.mark.parametrize(
    ("properties", "x_key", "y_key", "mpp_y"),
    [
        ({"tiff.XResolution": "20000", "tiff.YResolution": "5000", "tiff.ResolutionUnit": "centimeter",
          "openslide.mpp-x": "0.5", "openslide.mpp-y": "2"}, "tiff.XResolution", "tiff.YResolution", 2.0),
        ({"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.25"}, "openslide.mpp-x", "openslide.mpp-y", 0.25),
        ({"tiffslide.mpp-x": 0.5, "tiffslide.mpp-y": 0.6}, "tiffslide.mpp-x", "tiffslide.mpp-y", 0.6),
        ({"mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X": "0.5",
          "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y": "1.0"},
         "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X", "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y",
         1.0),
        ({"philips.DICOM_PIXEL_SPACING": '"0.001" "0.0005"'}, "philips.DICOM_PIXEL_SPACING",
         "philips.DICOM_PIXEL_SPACING", 1.0),
        ({"tiff.ImageDescription": OME_XML.replace('PhysicalSizeX="{size}"{unit}', 'PhysicalSizeX="0.5" PhysicalSizeY="0.7"')},
         "OME-XML PhysicalSizeX", "OME-XML PhysicalSizeY", 0.7),
    ],
    ids=["tiff-tags", "openslide", "tiffslide", "mirax", "philips", "ome"],
)
def test_non_square_pixels_warn(
    properties: dict, x_key: str, y_key: str, mpp_y: float, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="shared.slides.resolution"):
        mpp, _ = resolve_mpp(properties, path=SLIDE)

    assert mpp == pytest.approx(0.5)
    assert len(caplog.messages) == 1
    assert caplog.messages[0].startswith(
        f"slide {SLIDE} has non-square pixels: 0.5000 µm/px in x ({x_key}) and {mpp_y:.4f} µm/px in y ({y_key})"
    )


def test_nearly_square_pixels_do_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    properties = {"tiff.XResolution": "20000", "tiff.YResolution": "19500", "tiff.ResolutionUnit": "centimeter"}

    with caplog.at_level(logging.WARNING):
        result = resolve_mpp(properties, path=SLIDE)

    assert result == (0.5, "tiff-resolution")
    assert caplog.records == []


def test_tiff_unit_none_is_no_resolution() -> None:
    properties = {"tiff.XResolution": "72", "tiff.ResolutionUnit": "none"}

    with pytest.raises(SlideError) as raised:
        resolve_mpp(properties, path=SLIDE)

    assert raised.value.reason == "no_resolution"


@pytest.mark.parametrize(
    ("properties", "key", "value"),
    [
        ({"openslide.mpp-x": "1000", "openslide.objective-power": "20"}, "openslide.mpp-x", 1000.0),
        ({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}, "tiff.XResolution (72 pixels per inch)", 25400 / 72),
        ({"aperio.AppMag": "1000"}, "aperio.AppMag (objective power 1000x)", 0.01),
    ],
    ids=["metadata", "tiff-tags-72-dpi", "objective-power"],
)
def test_implausible_resolution_names_key(properties: dict, key: str, value: float) -> None:
    with pytest.raises(SlideError) as raised:
        resolve_mpp(properties, path=SLIDE)

    message = str(raised.value)
    assert raised.value.reason == "implausible_resolution"
    assert raised.value.value == pytest.approx(value)
    assert message.startswith(f"slide {SLIDE} reports a resolution of {value:g} µm/px in {key}")
    assert "mpp=<µm per pixel>" in message
    assert "--mpp <µm per pixel>" in message
    assert "--mpp-csv" in message


def test_no_resolution_names_overrides() -> None:
    with pytest.raises(SlideError) as raised:
        resolve_mpp({"openslide.vendor": "aperio", "tiff.ResolutionUnit": "inch"}, path=SLIDE)

    message = str(raised.value)
    assert raised.value.reason == "no_resolution"
    assert message.startswith(f"slide {SLIDE}: it has no resolution in its metadata")
    assert "mpp=<µm per pixel>" in message
    assert "--mpp <µm per pixel>" in message
    assert "--mpp-csv" in message


def test_plain_image_message_says_dpi_ignored() -> None:
    with pytest.raises(SlideError) as raised:
        resolve_mpp({}, path=Path("tile.png"), reader="pillow")

    message = str(raised.value)
    assert raised.value.reason == "no_resolution"
    assert "plain image, whose DPI says nothing about the scan" in message
    assert "--mpp-csv" in message


@pytest.mark.parametrize("override", [0.0, 0.01, 25.0, float("inf"), float("nan")])
def test_implausible_override_raises(override: float) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_mpp({"aperio.MPP": "0.5"}, path=SLIDE, override=override)

    assert f"slide {SLIDE}: the mpp override {override} µm/px is outside the plausible range" in str(raised.value)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_table_matches_path_name_and_stem(tmp_path: Path) -> None:
    (tmp_path / "batch").mkdir()
    table = MppTable.from_csv(
        write_csv(
            tmp_path / "mpp.csv",
            f"slide,mpp\n{tmp_path / 'batch' / 'a.svs'},0.25\nb.ndpi,0.5\nc,2.0\nbatch/d.tif,0.3\n",
        )
    )

    assert len(table) == 4
    assert table.lookup(tmp_path / "batch" / "a.svs") == 0.25
    assert table.lookup(Path("/elsewhere/b.ndpi")) == 0.5
    assert table.lookup(Path("/elsewhere/c.svs")) == 2.0
    assert table.lookup(tmp_path / "batch" / "d.tif") == 0.3
    assert table.lookup(Path("/elsewhere/a.svs")) == 0.25
    assert table.lookup(Path("/elsewhere/e.svs")) is None


def test_table_prefers_full_path(tmp_path: Path) -> None:
    table = MppTable.from_csv(
        write_csv(tmp_path / "mpp.csv", "slide,mpp\n/site-a/x.svs,0.25\n/site-b/x.svs,0.5\n")
    )

    assert table.lookup(Path("/site-a/x.svs")) == 0.25
    assert table.lookup(Path("/site-b/x.svs")) == 0.5


def test_table_ambiguous_name_raises(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "mpp.csv", "slide,mpp\n/site-a/x.svs,0.25\n/site-b/x.svs,0.5\n")
    table = MppTable.from_csv(csv_path)

    with pytest.raises(ConfigError) as raised:
        table.lookup(Path("/site-c/x.svs"))

    message = str(raised.value)
    assert message.startswith(f"mpp CSV {csv_path}: slide /site-c/x.svs matches several rows by file name")
    assert "line 2 ('/site-a/x.svs': 0.25)" in message
    assert "line 3 ('/site-b/x.svs': 0.5)" in message
    assert "Write the slide's full path" in message


def test_table_same_name_same_mpp_is_fine(tmp_path: Path) -> None:
    table = MppTable.from_csv(write_csv(tmp_path / "mpp.csv", "slide,mpp\n/a/x.svs,0.5\n/b/x.svs,0.5\n"))

    assert table.lookup(Path("/c/x.svs")) == 0.5


def test_table_reads_trident_wsi_column_and_bom(tmp_path: Path) -> None:
    csv_path = tmp_path / "trident.csv"
    csv_path.write_text("\ufeffwsi, mpp\nslide-1.svs,0.25\n\nslide-2.svs,\n", encoding="utf-8")

    table = MppTable.from_csv(csv_path)

    assert len(table) == 1
    assert table.lookup(Path("/data/slide-1.svs")) == 0.25
    assert table.lookup(Path("/data/slide-2.svs")) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("slide,mpp\na.svs,abc\n", "line 2, slide 'a.svs': mpp 'abc' is not a resolution between 0.05 and 20.0"),
        ("slide,mpp\na.svs,0.5\nb.svs,1000\n", "line 3, slide 'b.svs': mpp '1000' is not a resolution"),
        ("slide,mpp\n,0.5\n", "line 2: the slide cell is empty"),
        ("slide,mpp\na.svs,0.5\na.svs,0.25\n", "slide 'a.svs' has mpp 0.5 on line 2 and 0.25 on line 3"),
        ("name,resolution\na.svs,0.5\n", "has the columns ['name', 'resolution']; expected a slide (or wsi) column"),
    ],
    ids=["not-a-number", "implausible", "empty-slide", "conflicting-rows", "wrong-columns"],
)
def test_table_malformed_rows_raise(tmp_path: Path, text: str, expected: str) -> None:
    csv_path = write_csv(tmp_path / "mpp.csv", text)

    with pytest.raises(ConfigError) as raised:
        MppTable.from_csv(csv_path)

    message = str(raised.value)
    assert message.startswith(f"mpp CSV {csv_path}")
    assert expected in message


@pytest.mark.parametrize(("text", "expected"), [("0.25", 0.25), (" 2 ", 2.0), ("", None), ("  ", None)])
def test_parse_mpp_cell_valid(text: str, expected: float | None) -> None:
    assert parse_mpp_cell(text, where="mpp CSV list.csv, line 3, slide 'a.svs'") == expected


@pytest.mark.parametrize("text", ["abc", "0", "-0.5", "nan", "inf", "1e-9", "1000", "0.5 µm"])
def test_parse_mpp_cell_invalid_names_where(text: str) -> None:
    where = "mpp CSV list.csv, line 3, slide 'a.svs'"

    with pytest.raises(ConfigError) as raised:
        parse_mpp_cell(text, where=where)

    message = str(raised.value)
    assert message.startswith(f"{where}: mpp {text!r} is not a resolution between 0.05 and 20.0 µm per pixel")
    assert "leave the cell empty" in message
    assert raised.value.value == text
    assert raised.value.limit == [0.05, 20.0]


def test_table_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mpp CSV .*absent\.csv not found"):
        MppTable.from_csv(tmp_path / "absent.csv")


def test_table_override_opens_tcga(slides_dir: Path, tmp_path: Path) -> None:
    table = MppTable.from_csv(write_csv(tmp_path / "mpp.csv", f"slide,mpp\n{TCGA},{TCGA_MPP_ESTIMATE}\n"))

    with open_slide(slides_dir / TCGA, mpp=table.lookup(slides_dir / TCGA)) as slide:
        info = slide.info

    assert info.mpp == TCGA_MPP_ESTIMATE
    assert info.mpp_source == "override"
    assert info.level0_magnification == 5
