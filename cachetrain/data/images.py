"""Whether a file is a usable image, and the one-line error that names one that is not."""

from __future__ import annotations

import os

from cachetrain.errors import DataError

# torchvision's ImageFolder extensions (all of them decode in PIL and in DALI)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FIX = "replace or remove it, or set data.skip_bad_images: true to leave bad files out"



def image_problem(path: str, fast: bool = False) -> str | None:
    """Why `path` is not a usable image, in a few words, or None when it decodes. `fast`: JPEGs are decoded
    at 1/8 scale (PIL draft mode), which still reads the whole compressed stream, so truncation shows."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if fast:
                im.draft("RGB", (1, 1))
            im.load()  # PIL reports a truncated file only when it decodes it all
    except UnidentifiedImageError:
        return "not an image file PIL can read"
    except OSError as e:  # errno errors (permission, I/O) have a strerror; PIL's own ("image file is truncated") not
        return e.strerror if e.strerror else f"truncated or corrupt image ({e})"
    except Exception as e:  # noqa: BLE001 - PIL raises SyntaxError, ValueError, DecompressionBombError...
        return f"unreadable image ({type(e).__name__}: {e})"
    return None


def shown(path: str, root: str | os.PathLike | None = None, most: int = 240) -> str:
    """A file's name for a one-line message: relative to `root` when given and it is under it, control
    characters (a newline in a file name) and undecodable bytes escaped, the middle cut out of a very long
    one (links to folders are not followed, so a real path is rarely that long)."""
    if root is not None:
        rel = os.path.relpath(path, root)
        path = rel if not rel.startswith("..") else path
    text = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in str(path))
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates from undecodable bytes
    return text if len(text) <= most else f"{text[:most // 2 - 2]}...{text[-(most // 2 - 2):]}"


def bad_image_error(path: str, reason: str, root: str | os.PathLike | None = None) -> DataError:
    reason = " ".join(str(reason).split())  # one line whatever the library said
    return DataError(f"data.root: {shown(path, root)}: {reason}; {FIX}")
