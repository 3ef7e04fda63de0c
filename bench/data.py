"""Data preparation cost of a vision dataset (host only, no GPU needed): the Trainer's tokenising of
the Gemma 3 vision notebook's rows (one image, a short LaTeX answer, responses only) and the
collate of one batch, whose images are processed then. `--paths text,processor`: rows tokenised
from their text with the processor's fixed image expansion, or through the processor with each
image processed (the fallback, and what every row cost before). Prints one JSON line a path.

    python bench/data.py --rows 200 --image-size 896
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=896, help="the processor's image size (Gemma 3: 896)")
    ap.add_argument("--batch", type=int, default=4, help="rows a collated batch")
    ap.add_argument("--paths", default="text,processor")
    a = ap.parse_args()

    import minift
    from common import environment
    from minift.testing import write_tiny_gemma3_vision
    from minift.train.data import collate
    from minift.train.formats import normalize_row
    from minift.train.tokenize import make_encoder
    from notebook import dataset

    _, processor = minift.load(write_tiny_gemma3_vision(Path(tempfile.mkdtemp()) / "v"))
    processor.image_processor.size = {"height": a.image_size, "width": a.image_size}
    rows = dataset(a.rows, a.image_size)
    env = environment()
    for path in a.paths.split(","):
        enc = make_encoder(processor, max_length=2048, responses_only=True)
        if path == "processor":
            enc.__dict__["_image_text_cache"] = None  # as a processor without a fixed expansion
        t = time.perf_counter()
        examples = [enc.encode(normalize_row(r, i)) for i, r in enumerate(rows)]
        encode_s = time.perf_counter() - t
        t = time.perf_counter()
        batch = collate(examples[: a.batch], 0)
        collate_s = time.perf_counter() - t
        print(json.dumps(dict(path=path, rows=a.rows, image_size=a.image_size, encode_ms_a_row=round(encode_s / a.rows * 1e3, 2),
                              collate_ms=round(collate_s * 1e3, 1), batch=a.batch,
                              pixel_bytes_a_row=batch.tensors["pixel_values"][0].numel() * 4,
                              max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, **env)), flush=True)


if __name__ == "__main__":
    main()
