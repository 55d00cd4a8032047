"""Reading radio survey images (FITS, Jy/beam) and the metadata the pipeline needs from them.

Two entry points:

* :func:`read_image_info` reads the header only. It is cheap and is what the sensor calls for
  every new file; it already rejects unusable files (not FITS, still being written, no WCS, no beam,
  no observation time, a real spectral/polarisation cube).
* :func:`load_image` reads header and data in a single pass over the file and returns the 2-D
  plane in Jy/beam.

Accepted layouts: 2-D images and N-D CASA-style cubes (``RA---SIN, DEC--SIN, FREQ, STOKES`` in any
order after the two celestial axes) whose extra axes all have length 1. The celestial WCS is
``WCS(header).celestial`` and length-1 axes are squeezed away.

Header conventions (see the science brief, section 1):

* Beam: ``BMAJ``/``BMIN`` FWHM in degrees and ``BPA`` in degrees east of north. Some writers put
  arcseconds there; since no radio survey beam is larger than 2 deg, a ``BMAJ`` above 2 is taken to
  mean both axes are in arcsec (documented heuristic). ``BPA`` may be absent only for a circular
  beam. If ``BMIN > BMAJ`` the axes are swapped and the PA rotated by 90 deg (the same ellipse).
* Observation time: ``MJD-OBS`` if present, else ``DATE-OBS`` (ISO 8601), both interpreted in the
  time scale named by ``TIMESYS`` (default UTC, as the FITS standard says) and converted to UTC.
  This is the observation start, never the processing time (a flaw of the seed system).
* Frequency: the world value of a degenerate ``FREQ`` axis (wcslib converts MHz/GHz to Hz), else
  the ``RESTFRQ``/``RESTFREQ``/``FREQ`` keywords, else None.

Truncation: the FITS standard fixes the size of the primary HDU as the header blocks plus
``|BITPIX|/8 * NAXIS1 * ... * NAXISn`` data bytes padded to a multiple of 2880. A file smaller than
that is truncated or still being written; both readers check it from the header alone.

gzip-compressed images are not read (a clear ImageError says so): the truncation check needs the
uncompressed size, which would mean decompressing the whole file in the sensor.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS, FITSFixedWarning

FITS_BLOCK_BYTES = 2880
FITS_CARD_BYTES = 80
#: Headers longer than this are not plausible images (protects the sensor from huge non-FITS files).
MAX_HEADER_BLOCKS = 2000
#: A beam FWHM above this many degrees is read as arcsec (no radio survey beam is > 2 deg).
BEAM_ARCSEC_THRESHOLD = 2.0
#: TIMESYS values understood by astropy Time (FITS names, upper case) -> astropy scale names.
TIME_SCALES = {"UTC": "utc", "TAI": "tai", "TT": "tt", "TDT": "tt", "ET": "tt", "TDB": "tdb",
               "TCG": "tcg", "TCB": "tcb", "UT1": "ut1", "UT": "utc"}
FREQ_KEYWORDS = ("RESTFRQ", "RESTFREQ", "FREQ")


class ImageError(ValueError):
    """An image that cannot be used, with the reason; ``str(err) == f"{path}: {reason}"``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class Beam:
    """Restoring beam: FWHM major/minor axes in degrees, position angle in degrees east of north."""

    major_deg: float
    minor_deg: float
    pa_deg: float


@dataclass(frozen=True)
class ImageInfo:
    """Header metadata of one image (see the module docstring for the conventions)."""

    path: str
    mjd: float  # UTC MJD of the observation start
    date_obs: str  # ISO 8601 UTC of the observation start
    beam: Beam
    freq_hz: float | None
    shape: tuple[int, int]  # (ny, nx)
    wcs: WCS  # celestial, 2-D
    center_ra_deg: float
    center_dec_deg: float
    radius_deg: float  # angular distance from the centre pixel to the farthest image corner
    file_size: int  # bytes


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
    return any(block[i:i + 8] == b"END     " for i in range(0, FITS_BLOCK_BYTES, FITS_CARD_BYTES))


def _split_header(path: str, read_block) -> bytes:
    """Read header blocks with ``read_block()`` up to the END card; return the raw header bytes.

    Raises ImageError for a file that does not start like FITS or whose header never ends.
    """
    blocks = []
    while len(blocks) < MAX_HEADER_BLOCKS:
        block = read_block()
        if not blocks and not block:
            raise ImageError(path, "empty file (still being written?)")
        if not blocks and not block.startswith(b"SIMPLE  ="):
            raise ImageError(path, "not a FITS file (does not start with SIMPLE)")
        if len(block) < FITS_BLOCK_BYTES:
            raise ImageError(path, "truncated or corrupt FITS file (header ends before END card)")
        blocks.append(block)
        if _has_end_card(block):
            return b"".join(blocks)
    raise ImageError(path, f"truncated or corrupt FITS file (no END card in {MAX_HEADER_BLOCKS} "
                           "header blocks)")


def _parse_header(path: str, raw: bytes) -> fits.Header:
    """Parse raw header bytes; reject non-ASCII or malformed headers with an ImageError."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ImageError(path, "truncated or corrupt FITS file (non-ASCII bytes in header)"
                         ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's VerifyWarning for fixable cards
            header = fits.Header.fromstring(text)
    except Exception as exc:  # astropy raises several types for malformed cards
        raise ImageError(path, f"truncated or corrupt FITS file (bad header: {exc})") from None
    if header.get("SIMPLE") is not True:
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
    """Minimum size in bytes of a file whose primary HDU has this header (FITS standard 4.4.1).

    ``header_bytes + pad2880(|BITPIX|/8 * GCOUNT * (PCOUNT + NAXIS1 * ... * NAXISn))``; the data
    size is zero when NAXIS = 0.
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
        raise ImageError(path, f"truncated or corrupt FITS file (size {file_size} bytes, header "
                               f"implies {needed}; still being written?)")


# --------------------------------------------------------------------------------------------------
# Metadata from a parsed header
# --------------------------------------------------------------------------------------------------

def celestial_wcs(path: str, header: fits.Header) -> tuple[WCS, tuple[int, int]]:
    """Celestial 2-D WCS and image shape (ny, nx); extra axes must be degenerate (length 1).

    The two celestial axes must be FITS axes 1 and 2 (the data plane); any other axis of length
    > 1 (a real spectral or polarisation cube) is rejected with its number and CTYPE.
    """
    lengths = axis_lengths(path, header)
    if len(lengths) < 2 or math.prod(lengths) == 0:
        raise ImageError(path, "no image data in primary HDU")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)  # e.g. DATE-OBS/MJD-OBS fix-ups
            full = WCS(header)
    except Exception as exc:
        raise ImageError(path, f"invalid WCS ({exc})") from None
    if not full.has_celestial:
        raise ImageError(path, "no celestial WCS (CTYPE1/CTYPE2)")
    if sorted((full.wcs.lng, full.wcs.lat)) != [0, 1]:
        raise ImageError(path, "celestial axes are not image axes 1 and 2 (CTYPE1/CTYPE2: "
                               f"{header.get('CTYPE1')!r}, {header.get('CTYPE2')!r})")
    for axis, length in enumerate(lengths[2:], start=3):
        if length != 1:
            ctype = str(header.get(f"CTYPE{axis}", "unnamed")).split("-")[0] or "unnamed"
            raise ImageError(path,
                             f"image has non-degenerate axis {axis} ({ctype}, length {length})")
    wcs = full.celestial
    wcs.pixel_shape = (lengths[0], lengths[1])  # astropy order (nx, ny)
    return wcs, (lengths[1], lengths[0])


def _float_keyword(path: str, header: fits.Header, key: str) -> float | None:
    """A finite float keyword, None when absent; ImageError when present but not a finite number."""
    if key not in header:
        return None
    value = header[key]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ImageError(path, f"bad keyword {key} = {value!r} (not a number)") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ImageError(path, f"bad keyword {key} = {value!r} (not a finite number)")
    return number


def beam_from_header(path: str, header: fits.Header) -> Beam:
    """Beam from BMAJ/BMIN/BPA (degrees; both axes read as arcsec when BMAJ > 2, see module doc)."""
    major = _float_keyword(path, header, "BMAJ")
    minor = _float_keyword(path, header, "BMIN")
    for key, value in (("BMAJ", major), ("BMIN", minor)):
        if value is None:
            per_channel = header.get("CASAMBM")  # CASA wrote a BEAMS table instead of BMAJ
            hint = " (per-channel CASA beam tables are not supported)" if per_channel else ""
            raise ImageError(path, f"missing beam keyword {key}{hint}")
        if value <= 0:
            raise ImageError(path, f"bad beam keyword {key} = {value} (must be > 0)")
    pa = _float_keyword(path, header, "BPA")
    if pa is None:
        if major != minor:
            raise ImageError(path, "missing beam keyword BPA (beam is elliptical)")
        pa = 0.0
    if major > BEAM_ARCSEC_THRESHOLD:  # writer used arcsec, not degrees (documented heuristic)
        major, minor = major / 3600.0, minor / 3600.0
    if minor > major:  # same ellipse, described with the axes in the conventional order
        major, minor, pa = minor, major, pa + 90.0
    return Beam(major_deg=major, minor_deg=minor, pa_deg=pa)


def observation_time(path: str, header: fits.Header) -> Time:
    """Observation start as an astropy Time in UTC: MJD-OBS, else DATE-OBS (scale from TIMESYS)."""
    timesys = str(header.get("TIMESYS", "UTC")).strip().upper()
    if timesys not in TIME_SCALES:
        raise ImageError(path, f"unsupported TIMESYS '{timesys}'")
    scale = TIME_SCALES[timesys]
    mjd = _float_keyword(path, header, "MJD-OBS")
    date_obs = header.get("DATE-OBS")
    if mjd is None and date_obs is None:
        raise ImageError(path, "missing observation time (MJD-OBS or DATE-OBS)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ERFA "dubious year" past the leap-second table
            if mjd is not None:
                return Time(mjd, format="mjd", scale=scale).utc
            return Time(str(date_obs).strip(), scale=scale).utc
    except Exception:  # astropy raises ValueError/TypeError, ERFA its own errors
        what = f"MJD-OBS {mjd}" if mjd is not None else f"DATE-OBS '{date_obs}'"
        raise ImageError(path, f"unparseable {what}") from None


def frequency_hz(path: str, header: fits.Header) -> float | None:
    """Observing frequency in Hz from a FREQ axis (reference channel) or frequency keywords."""
    naxis = axis_lengths(path, header)
    for axis in range(3, len(naxis) + 1):
        if str(header.get(f"CTYPE{axis}", "")).upper().startswith("FREQ"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FITSFixedWarning)
                    spectral = WCS(header).sub([axis])  # wcslib converts CUNIT (MHz, GHz) to Hz
                return float(spectral.pixel_to_world_values(0.0))  # the single (first) channel
            except Exception as exc:
                raise ImageError(path, f"bad FREQ axis {axis} ({exc})") from None
    for key in FREQ_KEYWORDS:
        value = _float_keyword(path, header, key)
        if value is not None and value > 0:
            return value
    return None


def image_center_and_radius(wcs: WCS, shape: tuple[int, int]) -> tuple[float, float, float]:
    """(ra_deg, dec_deg) of the central pixel and the largest angular distance (deg) to a corner.

    The centre is pixel ((nx - 1)/2, (ny - 1)/2) (0-based); corners are the outer pixel edges
    (-0.5 and n - 0.5), so every pixel centre lies inside the circle. A corner that does not
    project onto the sky (huge SIN fields) gives radius 180 deg, i.e. "whole sky", never too small.
    Distances use the haversine formula, accurate at all separations.
    """
    ny, nx = shape
    x = np.array([(nx - 1) / 2.0, -0.5, nx - 0.5, -0.5, nx - 0.5])
    y = np.array([(ny - 1) / 2.0, -0.5, -0.5, ny - 0.5, ny - 0.5])
    ra_deg, dec_deg = wcs.pixel_to_world_values(x, y)
    ra_c, dec_c = float(ra_deg[0]), float(dec_deg[0])
    if not (math.isfinite(ra_c) and math.isfinite(dec_c)):
        raise ValueError("the image centre does not project onto the sky")
    sep = angular_distance_deg(ra_c, dec_c, ra_deg[1:], dec_deg[1:])
    radius = float(np.max(sep)) if np.isfinite(sep).all() else 180.0
    return ra_c % 360.0, dec_c, radius


def angular_distance_deg(ra1_deg, dec1_deg, ra2_deg, dec2_deg) -> np.ndarray:
    """Great-circle distance in degrees (haversine formula; stable at small separations)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, dtype=np.float64))
                            for v in (ra1_deg, dec1_deg, ra2_deg, dec2_deg))
    h = (np.sin((dec2 - dec1) / 2.0) ** 2
         + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2.0) ** 2)
    return np.degrees(2.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def info_from_header(path: str, header: fits.Header, header_bytes: int,
                     file_size: int) -> ImageInfo:
    """Validate a parsed primary header and build its ImageInfo (no data needed)."""
    _check_size(path, header, header_bytes, file_size)
    wcs, shape = celestial_wcs(path, header)
    beam = beam_from_header(path, header)
    time = observation_time(path, header)
    try:
        ra_c, dec_c, radius = image_center_and_radius(wcs, shape)
    except ValueError as exc:
        raise ImageError(path, str(exc)) from None
    return ImageInfo(
        path=path, mjd=float(time.mjd), date_obs=time.isot, beam=beam,
        freq_hz=frequency_hz(path, header), shape=shape, wcs=wcs,
        center_ra_deg=ra_c, center_dec_deg=dec_c, radius_deg=radius, file_size=file_size,
    )


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
    """Image metadata from the header only; the data array is never read.

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

        raw = _split_header(path, read_block)
    return info_from_header(path, _parse_header(path, raw), len(raw), file_size)


def load_image(path: str | os.PathLike) -> FitsImage:
    """Header and 2-D data plane (ny, nx, Jy/beam, native-endian float) of an image.

    The file is read from disk exactly once; astropy decodes the data (BSCALE/BZERO/BLANK) from
    the in-memory copy. Raises ImageError as :func:`read_image_info`, and also when the image is
    entirely NaN.
    """
    path = os.fspath(path)
    with _open_binary(path) as handle:
        raw_file = handle.read()
    _reject_gzip(path, raw_file[:2])
    blocks = (raw_file[i:i + FITS_BLOCK_BYTES]
              for i in range(0, MAX_HEADER_BLOCKS * FITS_BLOCK_BYTES, FITS_BLOCK_BYTES))
    raw_header = _split_header(path, lambda: next(blocks))
    info = info_from_header(path, _parse_header(path, raw_header), len(raw_header), len(raw_file))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(raw_file), memmap=False, lazy_load_hdus=True) as hdul:
                data = hdul[0].data
    except Exception as exc:
        raise ImageError(path, f"truncated or corrupt FITS file (cannot read data: {exc})"
                         ) from None
    if data is None:
        raise ImageError(path, "no image data in primary HDU")
    data = np.asarray(data).reshape(info.shape)  # squeeze the length-1 FREQ/STOKES axes
    if not np.issubdtype(data.dtype, np.floating):
        data = data.astype(np.float64)
    # FITS is big-endian; numpy arithmetic on non-native arrays is slower, so convert once here.
    data = data.astype(data.dtype.newbyteorder("="), copy=False)
    if not np.isfinite(data).any():
        raise ImageError(path, "image is entirely NaN (no finite pixels)")
    return FitsImage(info=info, data=data)
