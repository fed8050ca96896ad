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

The first value found decides: an implausible one raises instead of falling through to a later step,
because metadata that is present but wrong must be fixed by the user, not silently replaced.

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


def _philips_pixel_spacing_x(text: str) -> float:
    """Return µm/px from ``"<row spacing mm>" "<column spacing mm>"``: x is the column spacing."""
    values = [float(part.strip('"')) for part in text.split()]
    return 1000.0 * values[1]


# Vendor keys that state µm/px, each with the conversion to µm, as openslide 4.0.1 documents them.
# openslide copies each into openslide.mpp-x when it parses, so these matter when openslide could not
# parse the value or another reader produced the properties.
VENDOR_MPP_KEYS: tuple[tuple[str, Callable[[str], float]], ...] = (
    ("aperio.MPP", float),
    ("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X", float),
    ("philips.DICOM_PIXEL_SPACING", _philips_pixel_spacing_x),  # millimeters, row then column
    ("ventana.ScanRes", float),
    ("sakura.ResolutionMmPerPix", _scaled(1000.0)),
    ("zeiss.Scaling.Items.X.Value", _scaled(1e6)),  # meters
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

@dataclass(frozen=True)
class _Found:
    """A resolution found in the properties: µm/px, the key it came from, and the source step."""

    mpp: float
    key: str
    source: str
    detail: str = ""


def resolve_mpp(
    properties: Mapping[str, Any], *, path: str | Path, override: float | None = None, reader: str | None = None
) -> tuple[float, str]:
    """Return the slide's level-0 resolution in µm/px and its source, one of :data:`MPP_SOURCES`.

    ``properties`` are the slide properties of openslide or tiffslide (values may be strings or
    numbers). ``path`` names the slide in errors and warnings. ``reader`` ("pillow" for plain images)
    only changes the advice in the error. Raises :class:`ConfigError` for an implausible override,
    and :class:`SlideError` with reason ``no_resolution`` or ``implausible_resolution``.
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

    if not (MIN_MPP <= found.mpp <= MAX_MPP):
        raise SlideError(
            f"slide {path} reports a resolution of {found.mpp:g} µm/px in {found.key}{found.detail}, outside the "
            f"plausible range {MIN_MPP}-{MAX_MPP} µm/px, so its metadata is wrong. Pass the scan's true "
            f"resolution with {MPP_OVERRIDE_HINT}.",
            reason="implausible_resolution",
            value=found.mpp,
            limit=[MIN_MPP, MAX_MPP],
        )

    if found.source == "objective-power":
        logger.warning(
            "slide %s has no µm/px in its metadata, so its resolution is estimated as %.4f µm/px from the "
            "objective power in %s (%s / power). Pass %s if the scan's true resolution differs.",
            path, found.mpp, found.key, MICRONS_AT_1X, MPP_OVERRIDE_HINT,
        )
    return found.mpp, found.source


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


def _parse_positive(properties: Mapping[str, Any], key: str, parse: Callable[[str], float] = float) -> float | None:
    """Return the positive finite number in ``properties[key]``, or None when it is absent or unusable."""
    raw = properties.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = parse(str(raw).strip())
    except (ValueError, IndexError):
        logger.warning("ignoring slide property %s=%r: not a number", key, raw)
        return None
    if not math.isfinite(value) or value <= 0:
        logger.warning("ignoring slide property %s=%r: not a positive number", key, raw)
        return None
    return value


def _warn_if_not_square(properties: Mapping[str, Any], key_y: str, mpp_x: float) -> None:
    mpp_y = _parse_positive(properties, key_y)
    if mpp_y is not None and abs(mpp_y - mpp_x) > 0.05 * mpp_x:
        # NOTE: patches are square in level-0 pixels, so non-square pixels make them rectangles in µm.
        logger.warning("pixels are not square (x %.4f, y %.4f µm), so the x resolution is used", mpp_x, mpp_y)


def _mpp_from_metadata(properties: Mapping[str, Any]) -> _Found | None:
    # openslide and tiffslide fill *.mpp-x from the resolution tags for some formats (generic TIFF, NDPI,
    # Leica). Such a value only restates the tags, so it is left to the tiff-resolution step.
    from_tags = _mpp_from_tiff_resolution(properties)

    def library_mpp(key: str) -> _Found | None:
        mpp = _parse_positive(properties, key)
        if mpp is None or (from_tags is not None and math.isclose(mpp, from_tags.mpp, rel_tol=1e-6)):
            return None
        _warn_if_not_square(properties, key.replace("mpp-x", "mpp-y"), mpp)
        return _Found(mpp, key, "metadata")

    found = library_mpp("openslide.mpp-x")
    if found is not None:
        return found

    for key, parse in VENDOR_MPP_KEYS:
        mpp = _parse_positive(properties, key, parse)
        if mpp is not None:
            return _Found(mpp, key, "metadata")

    mpp = _mpp_from_hamamatsu_vms(properties)
    if mpp is not None:
        return _Found(mpp, "hamamatsu.PhysicalWidth", "metadata")

    return library_mpp("tiffslide.mpp-x") or _mpp_from_ome_xml(properties.get("tiff.ImageDescription"))


def _mpp_from_hamamatsu_vms(properties: Mapping[str, Any]) -> float | None:
    """Return µm/px of a Hamamatsu VMS or VMU slide: its physical width in nm over its level-0 width in px."""
    physical_width_nm = _parse_positive(properties, "hamamatsu.PhysicalWidth")
    width_px = _parse_positive(properties, "openslide.level[0].width")
    if physical_width_nm is None or width_px is None:
        return None
    return physical_width_nm / 1000.0 / width_px


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
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    if unit not in OME_UNIT_TO_UM:
        logger.warning("ignoring OME PhysicalSizeX: unknown unit %r; expected one of %s", unit, sorted(OME_UNIT_TO_UM))
        return None
    size = _parse_positive({"PhysicalSizeX": pixels.get("PhysicalSizeX")}, "PhysicalSizeX")
    if size is None:
        return None
    return _Found(size * OME_UNIT_TO_UM[unit], "OME-XML PhysicalSizeX", "metadata", f" ({size:g} {unit})")


def _mpp_from_tiff_resolution(properties: Mapping[str, Any]) -> _Found | None:
    resolution = _parse_positive(properties, "tiff.XResolution")
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    if resolution is None or unit not in RESOLUTION_UNIT_TO_UM:
        return None
    return _Found(
        RESOLUTION_UNIT_TO_UM[unit] / resolution,
        "tiff.XResolution",
        "tiff-resolution",
        f" ({resolution:g} pixels per {unit})",
    )


def _mpp_from_objective_power(properties: Mapping[str, Any]) -> _Found | None:
    for key in OBJECTIVE_POWER_KEYS:
        power = _parse_positive(properties, key, _parse_power)
        if power is not None:
            return _Found(MICRONS_AT_1X / power, key, "objective-power", f" (objective power {power:g}x)")

    ome_power = _ome_objective_power(properties.get("tiff.ImageDescription"))
    if ome_power is not None:
        return _Found(MICRONS_AT_1X / ome_power, "OME-XML NominalMagnification", "objective-power")
    return None


def _parse_power(text: str) -> float:
    """Parse ``"20"``, ``"20x"`` or ``"40X"`` (Leica writes a bare number, some scanners add an x)."""
    return float(re.sub(r"\s*[xX]$", "", text))


def _ome_objective_power(description: Any) -> float | None:
    if not isinstance(description, str) or "NominalMagnification" not in description:
        return None
    match = re.search(r'NominalMagnification="([^"]+)"', description)
    if match is None:
        return None
    return _parse_positive({"NominalMagnification": match.group(1)}, "NominalMagnification")


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
            if not mpp_text:
                continue  # no override: the slide's metadata is used

            mpp = _parse_table_mpp(path, line, slide, mpp_text)
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


def _parse_table_mpp(path: Path, line: int, slide: str, text: str) -> float:
    try:
        mpp = float(text)
    except ValueError:
        mpp = math.nan
    if not (math.isfinite(mpp) and MIN_MPP <= mpp <= MAX_MPP):
        raise ConfigError(
            f"mpp CSV {path}, line {line}: slide {slide!r} has mpp {text!r}; expected µm per pixel between "
            f"{MIN_MPP} and {MAX_MPP}, for example 0.25 for 40x or 0.5 for 20x. Fix the cell or leave it empty "
            "to use the slide's metadata.",
            value=text,
            limit=[MIN_MPP, MAX_MPP],
        )
    return mpp
