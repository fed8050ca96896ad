"""A slide's resolution in µm per level-0 pixel, from an override, its metadata or its objective power.

:func:`resolve_mpp` tries, in order:

1. ``override``: the user's value (``mpp=`` in Python, ``--mpp`` or a row of ``--mpp-csv`` on the
   command line). Source ``"override"``.
2. The metadata (source ``"metadata"``): openslide's normalised ``openslide.mpp-x``, then each vendor's
   own key as openslide 4.0.1 documents it (see :data:`VENDOR_MPP_KEYS`), then ``tiffslide.mpp-x``,
   then ``PhysicalSizeX`` in OME-XML. Where ``*.mpp-x`` only restates the TIFF resolution tags
   (generic TIFF, NDPI, Leica), it counts as the next step instead.
3. The TIFF resolution tags: ``tiff.XResolution`` in pixels per centimeter or per inch. Source
   ``"tiff-resolution"``.
4. The objective power alone (``openslide.objective-power``, ``aperio.AppMag``,
   ``hamamatsu.SourceLens`` and the like), as ``10 / power`` µm/px, with a logged warning because
   scanners at one power differ by up to about 10 %. Source ``"objective-power"``.

The first value found decides. An implausible one raises instead of falling through to a later step,
because metadata that is present but wrong must be fixed by the user, not silently replaced. That is a
value outside 0.05-20 µm/px, or one that is 0, negative, NaN, infinite, not a number or in an unknown unit.

:class:`MppTable` reads per-slide overrides from a CSV file.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from shared.errors import ConfigError, SlideError

logger = logging.getLogger(__name__)

# Plausible resolutions of a brightfield scan. Outside this range the metadata is wrong, for example in
# a TIFF whose resolution tags state 10 pixels per centimeter (1000 µm/px).
MIN_MPP = 0.05
MAX_MPP = 20.0

MPP_SOURCES = ("override", "metadata", "tiff-resolution", "objective-power")

MPP_OVERRIDE_HINT = (
    "mpp=<µm per pixel> in Python, or on the command line --mpp <µm per pixel> "
    "or --mpp-csv <CSV with slide and mpp columns>"
)

# The usual rule of thumb: a 10x objective gives about 1 µm/px, so 20x gives 0.5 and 40x gives 0.25.
MICRONS_AT_1X = 10.0

# Micrometers per unit of the TIFF ResolutionUnit tag. openslide writes the unit in lower case,
# tiffslide in upper case, and tifffile adds millimeter and micrometer to the TIFF standard's two.
RESOLUTION_UNIT_TO_UM = {"centimeter": 10_000.0, "inch": 25_400.0, "millimeter": 1_000.0, "micrometer": 1.0}

# Micrometers per unit of OME-XML's PhysicalSizeXUnit, whose default is µm. Writers use the micro sign
# (U+00B5), the Greek letter mu (U+03BC) or a plain u.
OME_UNIT_TO_UM = {"\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def _scaled(factor: float) -> Callable[[str], float]:
    return lambda text: float(text) * factor


def _philips_pixel_spacing(index: int) -> Callable[[str], float]:
    """Return a parser of ``"<row spacing mm>" "<column spacing mm>"``: x is the column spacing (index 1)."""

    def parse(text: str) -> float:
        values = [float(part.strip('"')) for part in text.split()]
        return 1000.0 * values[index]

    return parse


@dataclass(frozen=True)
class _VendorKey:
    """A vendor key that states the x resolution, its conversion to µm, and where the y resolution is."""

    key: str
    parse: Callable[[str], float]
    y_key: str | None = None
    y_parse: Callable[[str], float] = float


# Vendor keys that state µm/px, each with the conversion to µm, as openslide 4.0.1 documents them.
# openslide copies each into openslide.mpp-x when it parses, so these matter when openslide could not
# parse the value or another reader produced the properties.
VENDOR_MPP_KEYS: tuple[_VendorKey, ...] = (
    _VendorKey("aperio.MPP", float),
    _VendorKey(
        "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X",
        float,
        "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y",
    ),
    # millimeters, row spacing (y) then column spacing (x)
    _VendorKey(
        "philips.DICOM_PIXEL_SPACING", _philips_pixel_spacing(1), "philips.DICOM_PIXEL_SPACING", _philips_pixel_spacing(0)
    ),
    _VendorKey("ventana.ScanRes", float),
    _VendorKey("sakura.ResolutionMmPerPix", _scaled(1000.0)),
    _VendorKey("zeiss.Scaling.Items.X.Value", _scaled(1e6), "zeiss.Scaling.Items.Y.Value", _scaled(1e6)),  # meters
)

# Keys that state the objective power, in the order tried.
OBJECTIVE_POWER_KEYS = (
    "openslide.objective-power",
    "tiffslide.objective-power",
    "aperio.AppMag",
    "hamamatsu.SourceLens",
    "leica.objective",
    "mirax.GENERAL.OBJECTIVE_MAGNIFICATION",
    "ventana.Magnification",
    "sakura.NominalLensMagnification",
    "trestle.Objective Power",
    "argos.ObjectiveMagnification",
)

# x and y resolutions that differ by more than this fraction of x are logged as non-square pixels.
SQUARE_PIXEL_TOLERANCE = 0.05


@dataclass(frozen=True)
class _Value:
    """A property as found: its text, and its number, which is NaN when the text is not a number."""

    text: str
    number: float
    is_number: bool


@dataclass(frozen=True)
class _Found:
    """A resolution found in the properties: µm/px, the key it came from, the source step and the text found.

    ``mpp`` may be implausible (0, negative, NaN, infinite): :func:`resolve_mpp` rejects it then.
    ``problem`` explains why a value that is not a number cannot be used, and is empty for a number.
    ``mpp_y`` is the y resolution where the source states one.
    """

    mpp: float
    key: str
    source: str
    detail: str = ""
    text: str = ""
    problem: str = ""
    mpp_y: float | None = None
    y_key: str = ""


def resolve_mpp(
    properties: Mapping[str, Any], *, path: str | Path, override: float | None = None, reader: str | None = None
) -> tuple[float, str]:
    """Return the slide's level-0 resolution in µm/px and its source, one of :data:`MPP_SOURCES`.

    ``properties`` are the slide properties of openslide or tiffslide (values may be strings or
    numbers). ``path`` names the slide in errors and warnings. ``reader`` ("pillow" for plain images)
    only changes the advice in the error. Raises :class:`ConfigError` for an implausible override,
    and :class:`SlideError` with reason ``no_resolution`` or ``implausible_resolution``. Pixels whose
    x and y resolutions differ by more than 5 % are logged as a warning, and the x resolution is used.
    """
    if override is not None:
        return _checked_override(override, path), "override"

    found = (
        _mpp_from_metadata(properties)
        or _mpp_from_tiff_resolution(properties)
        or _mpp_from_objective_power(properties)
    )
    if found is None:
        raise _no_resolution_error(path, reader)
    if not (math.isfinite(found.mpp) and MIN_MPP <= found.mpp <= MAX_MPP):
        raise _implausible_error(path, found)

    _warn_if_not_square(path, found)
    if found.source == "objective-power":
        logger.warning(
            "slide %s has no µm/px in its metadata, so its resolution is estimated as %.4f µm/px from the "
            "objective power in %s (%s / power). Pass %s if the scan's true resolution differs.",
            path, found.mpp, found.key, MICRONS_AT_1X, MPP_OVERRIDE_HINT,
        )
    return found.mpp, found.source


def _implausible_error(path: str | Path, found: _Found) -> SlideError:
    if found.problem:
        stated = (
            f"{found.text!r} in {found.key}{found.detail}, {found.problem}, so its metadata is wrong. Expected a "
            f"resolution in the plausible range {MIN_MPP}-{MAX_MPP} µm/px"
        )
    else:
        stated = (
            f"a resolution of {found.mpp:g} µm/px in {found.key}{found.detail}, outside the plausible range "
            f"{MIN_MPP}-{MAX_MPP} µm/px, so its metadata is wrong"
        )
    return SlideError(
        f"slide {path} reports {stated}. Pass the scan's true resolution with {MPP_OVERRIDE_HINT}.",
        reason="implausible_resolution",
        # NaN and infinity are not valid JSON, so the state record gets the text found instead.
        value=found.mpp if math.isfinite(found.mpp) else found.text,
        limit=[MIN_MPP, MAX_MPP],
    )


def _checked_override(override: float, path: str | Path) -> float:
    if not (math.isfinite(override) and MIN_MPP <= override <= MAX_MPP):
        raise ConfigError(
            f"slide {path}: the mpp override {override} µm/px is outside the plausible range "
            f"{MIN_MPP}-{MAX_MPP} µm/px. Pass the scan's resolution, for example 0.25 for 40x or 0.5 for 20x.",
            value=override,
            limit=[MIN_MPP, MAX_MPP],
        )
    return float(override)


def _no_resolution_error(path: str | Path, reader: str | None) -> SlideError:
    if reader == "pillow":
        found = "it is a plain image, whose DPI says nothing about the scan, so it has no resolution"
    else:
        found = (
            "it has no resolution in its metadata (no µm/px key of openslide, tiffslide, the vendor or OME-XML, "
            "no tiff.XResolution in pixels per centimeter or inch, and no objective power)"
        )
    return SlideError(
        f"slide {path}: {found}. Pass the scan's resolution with {MPP_OVERRIDE_HINT}, "
        "for example 0.25 for a 40x scan or 0.5 for 20x.",
        reason="no_resolution",
        value=None,
        limit=[MIN_MPP, MAX_MPP],
    )


def _read_property(properties: Mapping[str, Any], key: str, parse: Callable[[str], float] = float) -> _Value | None:
    """Return ``properties[key]`` parsed, or None when it is absent or empty.

    A value that is present counts, even 0, negative, NaN or text: the caller rejects it rather than
    falling through to a later source.
    """
    raw = properties.get(key)
    if raw is None:
        return None
    text = str(raw).strip()
    if not text:
        return None
    try:
        return _Value(text, float(parse(text)), is_number=True)
    except (ValueError, IndexError, ZeroDivisionError):
        return _Value(text, math.nan, is_number=False)


def _divide(numerator: float, denominator: float) -> float:
    """Divide, with x / 0 as infinity, so that a zero in the metadata becomes an implausible resolution."""
    return math.inf if denominator == 0 else numerator / denominator


def _found(
    value: _Value, key: str, source: str, *, mpp: float | None = None, detail: str = "",
    y: _Value | None = None, y_key: str = "", mpp_y: float | None = None,
) -> _Found:
    """Build a :class:`_Found` from a property. ``mpp`` and ``mpp_y`` replace the values' numbers when given."""
    if mpp is None:
        mpp = value.number
    if mpp_y is None and y is not None and y.is_number:
        mpp_y = y.number
    return _Found(
        mpp=mpp,
        key=key,
        source=source,
        detail=detail,
        text=value.text,
        problem="" if value.is_number else "which is not a number",
        mpp_y=mpp_y,
        y_key=y_key,
    )


def _warn_if_not_square(path: str | Path, found: _Found) -> None:
    mpp_y = found.mpp_y
    if mpp_y is None or not (math.isfinite(mpp_y) and mpp_y > 0):
        return
    if abs(mpp_y - found.mpp) > SQUARE_PIXEL_TOLERANCE * found.mpp:
        # NOTE: patches are square in level-0 pixels, so non-square pixels make them rectangles in µm.
        logger.warning(
            "slide %s has non-square pixels: %.4f µm/px in x (%s) and %.4f µm/px in y (%s). Patches are square "
            "in level-0 pixels, so each covers a rectangle %.2f times as tall as it is wide, and the x resolution "
            "sets the patch size. Resample the slide to square pixels if patches must be square in µm.",
            path, found.mpp, found.key, mpp_y, found.y_key, mpp_y / found.mpp,
        )


def _mpp_from_metadata(properties: Mapping[str, Any]) -> _Found | None:
    # openslide and tiffslide fill *.mpp-x from the resolution tags for some formats (generic TIFF, NDPI,
    # Leica). Such a value only restates the tags, so it is left to the tiff-resolution step.
    from_tags = _mpp_from_tiff_resolution(properties)

    def library_mpp(key: str) -> _Found | None:
        value = _read_property(properties, key)
        if value is None or (from_tags is not None and math.isclose(value.number, from_tags.mpp, rel_tol=1e-6)):
            return None
        y_key = key.replace("mpp-x", "mpp-y")
        return _found(value, key, "metadata", y=_read_property(properties, y_key), y_key=y_key)

    found = library_mpp("openslide.mpp-x")
    if found is not None:
        return found

    for vendor in VENDOR_MPP_KEYS:
        value = _read_property(properties, vendor.key, vendor.parse)
        if value is not None:
            y = _read_property(properties, vendor.y_key, vendor.y_parse) if vendor.y_key else None
            return _found(value, vendor.key, "metadata", y=y, y_key=vendor.y_key or "")

    found = _mpp_from_hamamatsu_vms(properties)
    if found is not None:
        return found

    return library_mpp("tiffslide.mpp-x") or _mpp_from_ome_xml(properties.get("tiff.ImageDescription"))


def _mpp_from_hamamatsu_vms(properties: Mapping[str, Any]) -> _Found | None:
    """Return µm/px of a Hamamatsu VMS or VMU slide: its physical width in nm over its level-0 width in px."""
    physical_width = _read_property(properties, "hamamatsu.PhysicalWidth")
    width_px = _read_property(properties, "openslide.level[0].width")
    if physical_width is None or width_px is None or not width_px.is_number:
        return None
    physical_height = _read_property(properties, "hamamatsu.PhysicalHeight")
    height_px = _read_property(properties, "openslide.level[0].height")
    mpp_y = None
    if physical_height is not None and height_px is not None:
        mpp_y = _divide(physical_height.number / 1000.0, height_px.number)
    return _found(
        physical_width,
        "hamamatsu.PhysicalWidth",
        "metadata",
        mpp=_divide(physical_width.number / 1000.0, width_px.number),
        detail=f" ({physical_width.text} nm over {width_px.text} px)",
        y_key="hamamatsu.PhysicalHeight",
        mpp_y=mpp_y,
    )


def _mpp_from_ome_xml(description: Any) -> _Found | None:
    """Return ``PhysicalSizeX`` of the first OME ``Pixels`` element, converted from its unit to µm."""
    if not isinstance(description, str) or "<OME" not in description:
        return None
    try:
        root = ElementTree.fromstring(description.strip())
    except ElementTree.ParseError as error:
        logger.warning("ignoring OME-XML in tiff.ImageDescription: %s", error)
        return None

    pixels = next((element for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    size = _read_property(pixels.attrib, "PhysicalSizeX")
    if size is None:
        return None
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    key = "OME-XML PhysicalSizeX"
    if unit not in OME_UNIT_TO_UM:
        return _Found(
            math.nan, key, "metadata", text=size.text,
            problem=f"in the unit {unit!r}, which is not one of {sorted(OME_UNIT_TO_UM)}",
        )

    mpp_y = None
    size_y = _read_property(pixels.attrib, "PhysicalSizeY")
    unit_y = pixels.get("PhysicalSizeYUnit", "µm")
    if size_y is not None and unit_y in OME_UNIT_TO_UM:
        mpp_y = size_y.number * OME_UNIT_TO_UM[unit_y]
    return _found(
        size, key, "metadata", mpp=size.number * OME_UNIT_TO_UM[unit], detail=f" ({size.text} {unit})",
        y_key="OME-XML PhysicalSizeY", mpp_y=mpp_y,
    )


def _parse_rational(text: str) -> float:
    """Parse a TIFF RATIONAL as a number or as ``"numerator/denominator"``; n/0 is infinity and 0/0 NaN."""
    if "/" not in text:
        return float(text)
    numerator, denominator = (float(part) for part in text.split("/", 1))
    if denominator == 0:
        return math.nan if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / denominator


def _mpp_from_tiff_resolution(properties: Mapping[str, Any]) -> _Found | None:
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    if unit not in RESOLUTION_UNIT_TO_UM:
        return None
    resolution = _read_property(properties, "tiff.XResolution", _parse_rational)
    if resolution is None:
        return None
    resolution_y = _read_property(properties, "tiff.YResolution", _parse_rational)
    mpp_y = None
    if resolution_y is not None and resolution_y.is_number:
        mpp_y = _divide(RESOLUTION_UNIT_TO_UM[unit], resolution_y.number)
    return _found(
        resolution,
        "tiff.XResolution",
        "tiff-resolution",
        mpp=_divide(RESOLUTION_UNIT_TO_UM[unit], resolution.number),
        detail=f" ({resolution.text} pixels per {unit})",
        y_key="tiff.YResolution",
        mpp_y=mpp_y,
    )


def _mpp_from_objective_power(properties: Mapping[str, Any]) -> _Found | None:
    for key in OBJECTIVE_POWER_KEYS:
        power = _read_property(properties, key, _parse_power)
        if power is not None:
            return _objective_power_found(power, key)

    ome_power = _ome_objective_power(properties.get("tiff.ImageDescription"))
    if ome_power is not None:
        return _objective_power_found(ome_power, "OME-XML NominalMagnification")
    return None


def _objective_power_found(power: _Value, key: str) -> _Found:
    detail = f" (objective power {power.number:g}x)" if power.is_number else ""
    return _found(power, key, "objective-power", mpp=_divide(MICRONS_AT_1X, power.number), detail=detail)


def _parse_power(text: str) -> float:
    """Parse ``"20"``, ``"20x"`` or ``"40X"`` (Leica writes a bare number, some scanners add an x)."""
    return float(re.sub(r"\s*[xX]$", "", text))


def _ome_objective_power(description: Any) -> _Value | None:
    if not isinstance(description, str) or "NominalMagnification" not in description:
        return None
    match = re.search(r'NominalMagnification="([^"]*)"', description)
    if match is None:
        return None
    return _read_property({"NominalMagnification": match.group(1)}, "NominalMagnification")


class MppTable:
    """Per-slide resolution overrides read from a CSV file with a ``slide`` (or TRIDENT's ``wsi``) and an ``mpp`` column.

    A slide cell holds a path or a file name. A relative path is taken relative to the CSV's folder.
    :meth:`lookup` matches a slide by its full path, then by its file name, then by its stem, so
    ``slide-1.svs``, ``slide-1`` and ``/data/slide-1.svs`` all match ``/data/slide-1.svs``. An empty
    mpp cell means "use the slide's metadata".
    """

    SLIDE_COLUMNS = ("slide", "wsi")
    MPP_COLUMN = "mpp"

    def __init__(self, csv_path: Path, rows: list[tuple[int, str, float]]) -> None:
        self.csv_path = csv_path
        # (line number, slide cell, mpp, the cell as a resolved path)
        self._rows = [(line, cell, mpp, self._resolve(cell)) for line, cell, mpp in rows]

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"MppTable({str(self.csv_path)!r}, {len(self._rows)} rows)"

    @classmethod
    def from_csv(cls, path: str | Path) -> MppTable:
        """Read the table. Raises :class:`ConfigError` naming the CSV and the line of any malformed row."""
        path = Path(path)
        try:
            with path.open(newline="", encoding="utf-8-sig") as file:
                return cls._parse(path, csv.DictReader(file))
        except FileNotFoundError as error:
            raise ConfigError(
                f"mpp CSV {path} not found. Pass the path of an existing CSV with the columns slide and mpp.",
                value=str(path),
            ) from error
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise ConfigError(
                f"mpp CSV {path} cannot be read ({error}). Save it as UTF-8 text with the columns slide and mpp.",
                value=str(path),
            ) from error

    @classmethod
    def _parse(cls, path: Path, reader: csv.DictReader) -> MppTable:
        columns = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = columns
        slide_column = next((name for name in cls.SLIDE_COLUMNS if name in columns), None)
        if slide_column is None or cls.MPP_COLUMN not in columns:
            raise ConfigError(
                f"mpp CSV {path} has the columns {columns}; expected a slide (or wsi) column and an mpp column. "
                "Add a header line such as 'slide,mpp'.",
                value=columns,
            )

        rows: list[tuple[int, str, float]] = []
        first_row_by_slide: dict[str, tuple[int, float]] = {}
        for record in reader:
            line = reader.line_num
            slide = (record.get(slide_column) or "").strip()
            mpp_text = (record.get(cls.MPP_COLUMN) or "").strip()
            if not slide and not mpp_text:
                continue  # a blank line
            if not slide:
                raise ConfigError(
                    f"mpp CSV {path}, line {line}: the {slide_column} cell is empty. "
                    "Write the slide's path or file name, or delete the row.",
                    value=dict(record),
                )
            mpp = parse_mpp_cell(mpp_text, where=f"mpp CSV {path}, line {line}, slide {slide!r}")
            if mpp is None:
                continue  # no override: the slide's metadata is used

            earlier = first_row_by_slide.get(slide)
            if earlier is not None and earlier[1] != mpp:
                raise ConfigError(
                    f"mpp CSV {path}: slide {slide!r} has mpp {earlier[1]:g} on line {earlier[0]} and {mpp:g} on "
                    f"line {line}. Keep one row per slide.",
                    value=[earlier[1], mpp],
                )
            first_row_by_slide.setdefault(slide, (line, mpp))
            rows.append((line, slide, mpp))
        return cls(path, rows)

    def lookup(self, slide_path: str | Path) -> float | None:
        """Return the override for ``slide_path`` in µm/px, or None when no row names the slide.

        Raises :class:`ConfigError` when the rows that match at the first level that matches disagree,
        because then the table cannot tell which slide each row means.
        """
        slide_path = Path(slide_path)
        keys = (
            ("full path", lambda row: row[3] == slide_path.expanduser().resolve()),
            ("file name", lambda row: Path(row[1]).name == slide_path.name),
            ("stem", lambda row: _stem(row[1]) == slide_path.stem),
        )
        for kind, matches_slide in keys:
            matches = [row for row in self._rows if matches_slide(row)]
            if not matches:
                continue
            values = sorted({row[2] for row in matches})
            if len(values) > 1:
                lines = ", ".join(f"line {row[0]} ({row[1]!r}: {row[2]:g})" for row in matches)
                raise ConfigError(
                    f"mpp CSV {self.csv_path}: slide {slide_path} matches several rows by {kind} with different "
                    f"mpp values: {lines}. Write the slide's full path in the slide column so that one row matches.",
                    value=values,
                )
            return values[0]
        return None

    def _resolve(self, cell: str) -> Path:
        cell_path = Path(cell).expanduser()
        if not cell_path.is_absolute():
            cell_path = self.csv_path.parent / cell_path
        return cell_path.resolve()


def _stem(cell: str) -> str:
    """Return the stem of a slide cell's file name. A cell without an extension is its own stem."""
    return Path(Path(cell).name).stem


def parse_mpp_cell(text: str, *, where: str) -> float | None:
    """Parse a CSV cell that contains a slide's resolution in µm per pixel.

    Returns None for an empty cell, which means "use the slide's metadata". Raises
    :class:`ConfigError` naming ``where`` (for example "mpp CSV list.csv, line 3, slide 'a.svs'")
    for a cell that is not a number between :data:`MIN_MPP` and :data:`MAX_MPP`.
    """
    text = text.strip()
    if not text:
        return None
    try:
        mpp = float(text)
    except ValueError:
        mpp = math.nan
    if not (math.isfinite(mpp) and MIN_MPP <= mpp <= MAX_MPP):
        raise ConfigError(
            f"{where}: mpp {text!r} is not a resolution between {MIN_MPP} and {MAX_MPP} µm per pixel. Write the "
            "scan's resolution, for example 0.25 for 40x or 0.5 for 20x, or leave the cell empty to use the "
            "slide's metadata.",
            value=text,
            limit=[MIN_MPP, MAX_MPP],
        )
    return mpp
