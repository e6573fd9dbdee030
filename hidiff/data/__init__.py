"""Dataset reading, splits and NumPy preprocessing for hidiff (numpy + PIL + tifffile; no torch).

The torch ``Dataset`` lives in :mod:`hidiff.data.torch_dataset` and is not imported here, so this
package stays usable without torch. Typical use::

    from hidiff.data import get_reader, load_split

    reader = get_reader("kvasir-seg")
    info, cases = reader.open("../shared/data/Kvasir-SEG")
    train = load_split("kvasir-seg").select(cases, "train")
    image, mask = reader.load(train[0], info)     # float32 HWC in [0, 1], uint8 HW

Bad input raises :class:`DataError` (a ``ValueError``) naming the file.
"""

from hidiff.data.errors import DataError
from hidiff.data.info import Case, DatasetInfo, num_classes_for
from hidiff.data.io import load_case, read_image, read_mask
from hidiff.data.readers import (
    DatasetReader,
    available_readers,
    chase_subject,
    get_reader,
    open_dataset,
)
from hidiff.data.splits import Split, build_split, default_split, load_split, make_split
from hidiff.data.transforms import augment, random_crop, resize_pair
from reference.images import normalize

__all__ = [
    "Case", "DataError", "DatasetInfo", "DatasetReader", "Split", "augment", "available_readers",
    "build_split", "chase_subject", "default_split", "get_reader", "load_case",
    "load_split", "make_split", "normalize", "num_classes_for", "open_dataset", "random_crop",
    "read_image", "read_mask", "resize_pair",
]
