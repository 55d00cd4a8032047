"""Reading radio survey images (FITS) and the metadata the pipeline needs from them.

Two entry points:

* :func:`read_image_info` reads the header only (plus, for CASA multi-beam images, the small
  ``BEAMS`` table extension; the image data are skipped with a seek). It is cheap and is what the
  sensor calls for every new file; it already rejects unusable files (not FITS, still being
  written, no WCS, unsupported frame or unit, no beam, no or contradictory observation time, a
  real spectral/polarisation cube).
* :func:`load_image` reads the file once and returns the 2-D plane in Jy/beam, with the same
  metadata; it also rejects images with no finite pixel or a constant value.

Both readers build the metadata with the same code (:func:`info_from_header`), so they agree.

Layout. 2-D images and N-D cubes whose non-celestial axes (``FREQ``, ``STOKES``...) all have
length 1, with the two celestial axes anywhere and in either order (``DEC--SIN`` as axis 1, or
``FREQ`` before them). The layout is normalised at read time: the returned WCS is 2-D with
longitude (RA or GLON) first, ``shape = (ny, nx)`` with x along longitude, and the data plane is
indexed ``[y, x]`` (transposed from the file when latitude came first).

Frames (:mod:`ese_assets.core.frames`). The WCS stays in the image's own frame (ICRS, FK5, FK4 with
its equinox, or Galactic); ``ImageInfo.frame`` names it. ``center_ra_deg``/``center_dec_deg`` are
always ICRS RA/Dec, whatever the frame. Catalog positions (ICRS) are transformed into the image's
frame by :func:`ese_assets.core.frames.icrs_to_frame` before any pixel computation.

Header conventions (:mod:`ese_assets.core.fits_header`, where each is documented in full):

* ``BUNIT``: Jy/beam, mJy/beam or uJy/beam (common spellings); the data are scaled to Jy/beam.
  Missing ``BUNIT`` means Jy/beam. Other units (K, Jy/pixel, MJy/sr...) are rejected, naming them.
* Beam: ``BMAJ``/``BMIN``/``BPA`` (degrees; arcsec recognised against the pixel scale, not by a
  fixed cut), else the CASA ``BEAMS`` table when ``CASAMBM = T``, else the last
  ``AIPS CLEAN BMAJ=`` ``HISTORY`` card. BPA is east of north in the image's own frame.
* Observation time: ``DATE-OBS``/``MJD-OBS`` in ``TIMESYS`` (default UTC), converted to UTC; both
  present and more than 1 s apart is an error naming both values.
* Frequency: the world value of a degenerate ``FREQ`` axis (wcslib converts MHz/GHz to Hz), else
  the ``RESTFRQ``/``RESTFREQ``/``FREQ`` keywords, else None.

Truncation: the FITS standard fixes the size of an HDU as the header blocks plus
``|BITPIX|/8 * GCOUNT * (PCOUNT + NAXIS1 * ... * NAXISn)`` data bytes padded to a multiple of
2880. A file smaller than that is truncated or still being written; both readers check it from
the header alone.

gzip-compressed images are not read (a clear ImageError says so): the truncation check needs the
uncompressed size, which would mean decompressing the whole file in the sensor.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from ese_assets.core.beam import Beam
from ese_assets.core.fits_header import (
    TIME_SCALES,
    ImageError,
    beam_from_aips_history,
    beam_from_beams_table,
    beam_from_keywords,
    float_keyword,
    jyb_per_unit,
    missing_beam_error,
    observation_time,
)
from ese_assets.core.frames import (
    FrameError,
    angular_distance_deg,
    frame_name,
    image_center_and_radius,
)

__all__ = [
    "TIME_SCALES",
    "Beam",
    "FitsImage",
    "ImageError",
    "ImageInfo",
    "angular_distance_deg",
    "image_center_and_radius",
    "load_image",
    "observation_time",
    "read_image_info",
]

FITS_BLOCK_BYTES = 2880
FITS_CARD_BYTES = 80
#: Headers longer than this are not plausible images (protects the sensor from huge non-FITS files).
MAX_HEADER_BLOCKS = 2000
#: Extensions looked at when searching for a CASA BEAMS table (AIPS files carry a few tables).
MAX_EXTENSIONS = 64
FREQ_KEYWORDS = ("RESTFRQ", "RESTFREQ", "FREQ")

#: ``read_at(offset, n_bytes) -> bytes`` (fewer bytes at the end of the file).
ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True)
class ImageInfo:
    """Header metadata of one image (see the module docstring for the conventions)."""

    path: str
    mjd: float  # UTC MJD of the observation start
    date_obs: str  # ISO 8601 UTC of the observation start
    beam: Beam
    freq_hz: float | None
    shape: tuple[int, int]  # (ny, nx), x along longitude
    wcs: WCS  # celestial, 2-D, longitude first, in the image's own frame
    center_ra_deg: float  # ICRS
    center_dec_deg: float  # ICRS
    radius_deg: float  # angular distance from the centre pixel to the farthest image corner
    file_size: int  # bytes
    frame: str = "icrs"  # the WCS's frame, e.g. 'icrs', 'fk4 B1950.000', 'galactic'
    jyb_per_unit: float = 1.0  # factor from the file's BUNIT to Jy/beam


@dataclass(frozen=True)
class FitsImage:
    """An image: its metadata and the 2-D data plane (ny, nx) in Jy/beam, NaN blanks kept."""

    info: ImageInfo
    data: np.ndarray


# --------------------------------------------------------------------------------------------------
# Raw header access and the size check
# --------------------------------------------------------------------------------------------------


def _has_end_card(block: bytes) -> bool:
    """True if a 2880-byte header block holds the END card (at the start of an 80-byte card)."""
    return any(block[i : i + 8] == b"END     " for i in range(0, FITS_BLOCK_BYTES, FITS_CARD_BYTES))


def _split_header(path: str, read_block, first_card: bytes = b"SIMPLE  =") -> bytes:
    """Read header blocks with ``read_block()`` up to the END card; return the raw header bytes.

    ``first_card`` is ``SIMPLE  =`` for the primary header, ``XTENSION=`` for an extension.
    Raises ImageError for a header that does not start that way or never ends.
    """
    blocks = []
    while len(blocks) < MAX_HEADER_BLOCKS:
        block = read_block()
        if not blocks and not block:
            raise ImageError(path, "empty file (still being written?)")
        if not blocks and not block.startswith(first_card):
            if first_card.startswith(b"SIMPLE"):
                raise ImageError(path, "not a FITS file (does not start with SIMPLE)")
            raise ImageError(path, "corrupt FITS extension (does not start with XTENSION)")
        if len(block) < FITS_BLOCK_BYTES:
            raise ImageError(path, "truncated or corrupt FITS file (header ends before END card)")
        blocks.append(block)
        if _has_end_card(block):
            return b"".join(blocks)
    raise ImageError(
        path, f"truncated or corrupt FITS file (no END card in {MAX_HEADER_BLOCKS} header blocks)"
    )


def _parse_header(path: str, raw: bytes, *, primary: bool = True) -> fits.Header:
    """Parse raw header bytes; reject non-ASCII or malformed headers with an ImageError."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ImageError(
            path, "truncated or corrupt FITS file (non-ASCII bytes in header)"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's VerifyWarning for fixable cards
            header = fits.Header.fromstring(text)
    except Exception as exc:  # astropy raises several types for malformed cards
        raise ImageError(path, f"truncated or corrupt FITS file (bad header: {exc})") from None
    if primary and header.get("SIMPLE") is not True:
        raise ImageError(path, "not a standard FITS file (SIMPLE is not T)")
    return header


def _int_keyword(path: str, header: fits.Header, key: str, default: int | None = None) -> int:
    value = header.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ImageError(path, f"missing or bad keyword {key} ({value!r})")
    return value


def axis_lengths(path: str, header: fits.Header) -> list[int]:
    """``[NAXIS1, ..., NAXISn]`` (FITS order: x first) validated as non-negative integers."""
    naxis = _int_keyword(path, header, "NAXIS")
    lengths = [_int_keyword(path, header, f"NAXIS{i}") for i in range(1, naxis + 1)]
    if any(n < 0 for n in lengths):
        raise ImageError(path, f"negative axis length in NAXISn {lengths}")
    return lengths


def expected_file_size(path: str, header: fits.Header, header_bytes: int) -> int:
    """Size in bytes of an HDU with this header, i.e. the minimum file size for a primary HDU.

    ``header_bytes + pad2880(|BITPIX|/8 * GCOUNT * (PCOUNT + NAXIS1 * ... * NAXISn))``; the data
    size is zero when NAXIS = 0 (FITS standard 4.4.1 and 7.3).
    """
    bitpix = _int_keyword(path, header, "BITPIX")
    if bitpix not in (8, 16, 32, 64, -32, -64):
        raise ImageError(path, f"bad BITPIX {bitpix}")
    lengths = axis_lengths(path, header)
    n_pixels = math.prod(lengths) if lengths else 0
    gcount = _int_keyword(path, header, "GCOUNT", 1)
    pcount = _int_keyword(path, header, "PCOUNT", 0)
    data_bytes = abs(bitpix) // 8 * gcount * (pcount + n_pixels)
    padded = -(-data_bytes // FITS_BLOCK_BYTES) * FITS_BLOCK_BYTES
    return header_bytes + padded


def _check_size(path: str, header: fits.Header, header_bytes: int, file_size: int) -> None:
    needed = expected_file_size(path, header, header_bytes)
    if file_size < needed:
        raise ImageError(
            path,
            f"truncated or corrupt FITS file (size {file_size} bytes, header "
            f"implies {needed}; still being written?)",
        )


# --------------------------------------------------------------------------------------------------
# Layout: celestial axes, WCS, data plane
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where the image plane is in the file: 0-based FITS axes of longitude and latitude."""

    wcs: WCS  # 2-D, longitude first
    shape: tuple[int, int]  # (ny, nx) = (length of the latitude axis, of the longitude axis)
    lon_axis: int
    lat_axis: int


def _layout(path: str, header: fits.Header) -> _Layout:
    """The celestial axes of the primary HDU; every other axis must have length 1."""
    lengths = axis_lengths(path, header)
    if len(lengths) < 2 or math.prod(lengths) == 0:
        raise ImageError(path, "no image data in primary HDU")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)  # e.g. DATE-OBS/MJD-OBS fix-ups
            full = WCS(header)
    except Exception as exc:
        raise ImageError(path, f"invalid WCS ({exc})") from None
    if not full.has_celestial or full.wcs.lng < 0 or full.wcs.lat < 0:
        raise ImageError(path, "no celestial WCS (CTYPE1/CTYPE2)")
    lon, lat = int(full.wcs.lng), int(full.wcs.lat)
    for axis, length in enumerate(lengths):
        if axis not in (lon, lat) and length != 1:
            ctype = str(header.get(f"CTYPE{axis + 1}", "unnamed")).split("-")[0] or "unnamed"
            raise ImageError(
                path, f"image has non-degenerate axis {axis + 1} ({ctype}, length {length})"
            )
    try:
        wcs = full.sub([lon + 1, lat + 1])  # longitude first, whatever the file's order
    except Exception as exc:
        raise ImageError(path, f"invalid WCS ({exc})") from None
    wcs.pixel_shape = (lengths[lon], lengths[lat])  # astropy order (nx, ny)
    return _Layout(wcs=wcs, shape=(lengths[lat], lengths[lon]), lon_axis=lon, lat_axis=lat)


def celestial_wcs(path: str, header: fits.Header) -> tuple[WCS, tuple[int, int]]:
    """Celestial 2-D WCS (longitude first) and image shape (ny, nx); see the module docstring."""
    layout = _layout(path, header)
    return layout.wcs, layout.shape


def _data_plane(data: np.ndarray, layout: _Layout) -> np.ndarray:
    """The 2-D plane ``[y = latitude, x = longitude]`` of an N-D array in numpy (reversed) order."""
    n = data.ndim
    index: list[int | slice] = [0] * n
    index[n - 1 - layout.lon_axis] = slice(None)
    index[n - 1 - layout.lat_axis] = slice(None)
    plane = data[tuple(index)]
    # numpy puts the higher FITS axis first: latitude first (no transpose) iff lat_axis > lon_axis.
    return plane if layout.lat_axis > layout.lon_axis else np.ascontiguousarray(plane.T)


def pixel_scale_deg(wcs: WCS) -> float:
    """Geometric-mean pixel side in degrees: sqrt(|det(pixel scale matrix)|)."""
    return math.sqrt(abs(float(np.linalg.det(wcs.pixel_scale_matrix))))


# --------------------------------------------------------------------------------------------------
# Metadata from a parsed header
# --------------------------------------------------------------------------------------------------


def frequency_hz(path: str, header: fits.Header) -> float | None:
    """Observing frequency in Hz from a FREQ axis (reference channel) or frequency keywords."""
    naxis = axis_lengths(path, header)
    for axis in range(1, len(naxis) + 1):
        if str(header.get(f"CTYPE{axis}", "")).upper().startswith("FREQ"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FITSFixedWarning)
                    spectral = WCS(header).sub([axis])  # wcslib converts CUNIT (MHz, GHz) to Hz
                return float(spectral.pixel_to_world_values(0.0))  # the single (first) channel
            except Exception as exc:
                raise ImageError(path, f"bad FREQ axis {axis} ({exc})") from None
    for key in FREQ_KEYWORDS:
        value = float_keyword(path, header, key)
        if value is not None and value > 0:
            return value
    return None


def _beams_table(
    path: str, header: fits.Header, header_bytes: int, file_size: int, read_at: ReadAt
) -> fits.BinTableHDU | None:
    """The ``BEAMS`` binary table extension, if any: extension headers are read, data skipped."""
    offset = expected_file_size(path, header, header_bytes)
    for _ in range(MAX_EXTENSIONS):
        if offset + FITS_BLOCK_BYTES > file_size:
            return None
        if not read_at(offset, FITS_BLOCK_BYTES).startswith(b"XTENSION="):
            return None  # e.g. zero padding after the last HDU
        blocks = (
            read_at(offset + i * FITS_BLOCK_BYTES, FITS_BLOCK_BYTES)
            for i in range(MAX_HEADER_BLOCKS)
        )
        raw = _split_header(path, lambda blocks=blocks: next(blocks, b""), first_card=b"XTENSION=")
        ext = _parse_header(path, raw, primary=False)
        size = expected_file_size(path, ext, len(raw))
        if str(ext.get("EXTNAME", "")).strip().upper() == "BEAMS":
            if offset + size > file_size:
                raise ImageError(
                    path,
                    "truncated or corrupt FITS file (BEAMS table extension "
                    "ends after the end of the file)",
                )
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    table = fits.BinTableHDU.fromstring(read_at(offset, size))
                    table.data  # noqa: B018 - decode now, inside the error boundary
            except Exception as exc:
                raise ImageError(path, f"corrupt CASA BEAMS table ({exc})") from None
            if not isinstance(table, fits.BinTableHDU):
                raise ImageError(path, "CASA BEAMS extension is not a binary table")
            return table
        offset += size
    return None


def _beam(
    path: str,
    header: fits.Header,
    wcs: WCS,
    header_bytes: int,
    file_size: int,
    read_at: ReadAt | None,
) -> Beam:
    """BMAJ/BMIN/BPA keywords, else the CASA BEAMS table (CASAMBM = T), else AIPS HISTORY."""
    scale = pixel_scale_deg(wcs)
    if not (math.isfinite(scale) and scale > 0):
        raise ImageError(path, "degenerate WCS (zero pixel scale)")
    beam = beam_from_keywords(path, header, scale)
    if beam is None and header.get("CASAMBM") is True and read_at is not None:
        table = _beams_table(path, header, header_bytes, file_size, read_at)
        if table is not None:
            beam = beam_from_beams_table(path, table)
    if beam is None:
        beam = beam_from_aips_history(path, header)
    if beam is None:
        raise missing_beam_error(path, header)
    return beam


def info_from_header(
    path: str, header: fits.Header, header_bytes: int, file_size: int, read_at: ReadAt | None = None
) -> ImageInfo:
    """Validate a parsed primary header and build its ImageInfo (no image data needed).

    ``read_at`` reads bytes of the file at an offset; it is needed only for a CASA BEAMS table.
    """
    return _info_and_layout(path, header, header_bytes, file_size, read_at)[0]


def _info_and_layout(
    path: str, header: fits.Header, header_bytes: int, file_size: int, read_at: ReadAt | None
) -> tuple[ImageInfo, _Layout]:
    _check_size(path, header, header_bytes, file_size)
    layout = _layout(path, header)
    wcs, shape = layout.wcs, layout.shape
    try:
        frame = frame_name(wcs)
    except FrameError as exc:
        raise ImageError(path, str(exc)) from None
    scale = jyb_per_unit(path, header)
    beam = _beam(path, header, wcs, header_bytes, file_size, read_at)
    time = observation_time(path, header)
    try:
        ra_c, dec_c, radius = image_center_and_radius(wcs, shape)
    except ValueError as exc:
        raise ImageError(path, str(exc)) from None
    info = ImageInfo(
        path=path,
        mjd=float(time.mjd),
        date_obs=time.isot,
        beam=beam,
        freq_hz=frequency_hz(path, header),
        shape=shape,
        wcs=wcs,
        center_ra_deg=ra_c,
        center_dec_deg=dec_c,
        radius_deg=radius,
        file_size=file_size,
        frame=frame,
        jyb_per_unit=scale,
    )
    return info, layout


# --------------------------------------------------------------------------------------------------
# Public readers
# --------------------------------------------------------------------------------------------------


def _open_binary(path: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageError(path, "not a FITS file (is a directory)") from None
    except OSError as exc:
        raise ImageError(path, f"cannot open file ({exc.strerror})") from None


def _reject_gzip(path: str, first_bytes: bytes) -> None:
    if first_bytes.startswith(b"\x1f\x8b"):
        raise ImageError(path, "not a FITS file (gzip-compressed; decompress it first)")


def read_image_info(path: str | os.PathLike) -> ImageInfo:
    """Image metadata from the header only; the image data are never read.

    Raises ImageError naming the problem (see the module docstring).
    """
    path = os.fspath(path)
    with _open_binary(path) as handle:
        file_size = os.fstat(handle.fileno()).st_size
        first = handle.read(FITS_BLOCK_BYTES)
        _reject_gzip(path, first)
        pending = [first]

        def read_block() -> bytes:
            return pending.pop() if pending else handle.read(FITS_BLOCK_BYTES)

        def read_at(offset: int, n_bytes: int) -> bytes:
            handle.seek(offset)
            return handle.read(n_bytes)

        raw = _split_header(path, read_block)
        return info_from_header(path, _parse_header(path, raw), len(raw), file_size, read_at)


def _constant_value(data: np.ndarray) -> float | None:
    """The value of an image whose finite pixels are all equal, else None (needs a finite pixel)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanmin(data), np.nanmax(data)
    return float(low) if low == high else None


def load_image(path: str | os.PathLike) -> FitsImage:
    """Header and 2-D data plane (ny, nx, Jy/beam, native-endian float) of an image.

    The file is read from disk exactly once; astropy decodes the data (BSCALE/BZERO/BLANK) from
    the in-memory copy, and the plane is scaled from BUNIT to Jy/beam. Raises ImageError as
    :func:`read_image_info`, and also when the image has no finite pixel or is constant.
    """
    path = os.fspath(path)
    with _open_binary(path) as handle:
        raw_file = handle.read()
    _reject_gzip(path, raw_file[:2])
    blocks = (
        raw_file[i : i + FITS_BLOCK_BYTES]
        for i in range(0, MAX_HEADER_BLOCKS * FITS_BLOCK_BYTES, FITS_BLOCK_BYTES)
    )
    raw_header = _split_header(path, lambda: next(blocks))
    info, layout = _info_and_layout(
        path,
        _parse_header(path, raw_header),
        len(raw_header),
        len(raw_file),
        lambda offset, n: raw_file[offset : offset + n],
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(raw_file), memmap=False, lazy_load_hdus=True) as hdul:
                data = hdul[0].data
    except Exception as exc:
        raise ImageError(
            path, f"truncated or corrupt FITS file (cannot read data: {exc})"
        ) from None
    if data is None:
        raise ImageError(path, "no image data in primary HDU")
    data = _data_plane(np.asarray(data), layout)  # squeeze FREQ/STOKES axes, lon along x
    if not np.issubdtype(data.dtype, np.floating):
        data = data.astype(np.float64)
    # FITS is big-endian; numpy arithmetic on non-native arrays is slower, so convert once here.
    data = data.astype(data.dtype.newbyteorder("="), copy=False)
    if info.jyb_per_unit != 1.0:
        data = data * data.dtype.type(info.jyb_per_unit)
    if not np.isfinite(data).any():
        raise ImageError(path, "image is entirely NaN (no finite pixels)")
    constant = _constant_value(data)
    if constant is not None:
        raise ImageError(path, f"image is constant (all pixels = {constant:g})")
    return FitsImage(info=info, data=data)
