"""Write the paper's datasets in their real on-disk layouts (docs/paper.md) from generated images: the whole-job
benchmark's fixtures (`mysproj.data.shapes`) and the prep tests' small cases use the same writers.

Every writer takes `image(n) -> bytes`, the encoded image for a unique index `n` (a module-level function or a
partial where `workers` > 1, so that it can be sent to worker processes).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

ImageSource = Callable[[int], bytes]
CRISISMMD_TSV_HEADER = ["event_name", "tweet_id", "image_id", "tweet_text", "image", "label", "label_text",
                        "label_image", "label_text_image"]


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _encode(job: tuple[ImageSource, str, int]) -> None:
    image, path, n = job
    write(path, image(n))


def write_images(files: list[tuple[str, int]], image: ImageSource, workers: int = 0) -> None:
    """Write `image(n)` to each `(path, n)`; in `workers` processes where more than one is asked for."""
    jobs = [(image, path, n) for path, n in files]
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            _encode(job)
        return

    with ProcessPoolExecutor(workers) as pool:
        for _ in pool.map(_encode, jobs, chunksize=max(1, len(jobs) // (workers * 8))):
            pass


def write_dtd(root: str, counts: dict[str, dict[str, int]], image: ImageSource, split: int = 1,
              workers: int = 0) -> str:
    """`root/dtd/images/<class>/<class>_<NNNN>.jpg` and `labels/<split name><split>.txt`; `counts = {split
    name: {class: images}}` (DTD: train, val, test). Returns the `dtd` folder."""
    dtd = os.path.join(root, "dtd")
    lines: dict[str, list[str]] = {s: [] for s in counts}
    files, n = [], 0
    classes = list(dict.fromkeys(c for per_class in counts.values() for c in per_class))
    for cls in classes:
        for s, per_class in counts.items():
            for _ in range(per_class.get(cls, 0)):
                n += 1
                rel = f"{cls}/{cls}_{n:04d}.jpg"
                files.append((os.path.join(dtd, "images", rel), n))
                lines[s].append(rel)
    write_images(files, image, workers)
    for s, rels in lines.items():
        write(os.path.join(dtd, "labels", f"{s}{split}.txt"), ("\n".join(rels) + "\n").encode())
    return dtd


def write_imagefolder(root: str, counts: dict[str, dict[str, int]], image: ImageSource, ext: str = ".jpg",
                      workers: int = 0, first_index: int = 1) -> str:
    """`root/<split>/<class>/img_<i><ext>` (PlantDoc, DermNet), `counts = {split: {class: images}}`."""
    files, n = [], first_index
    for split, per_class in counts.items():
        for cls, count in per_class.items():
            for i in range(count):
                files.append((os.path.join(root, split, cls, f"img_{i}{ext}"), n))
                n += 1
    write_images(files, image, workers)
    return root


def write_crisismmd(root: str, rows: dict[str, list[tuple[str | None, str]]], image: ImageSource,
                    workers: int = 0) -> str:
    """`data_image/<event>/<date>/<tweet>_0.jpg` and the humanitarian split TSVs. `rows = {split: [(image path
    relative to the root, or None to generate one, label_image)]}`; the text-task label columns get another value,
    so that reading the wrong column shows."""
    files, n = [], 0
    for split in ("train", "dev", "test"):
        out = ["\t".join(CRISISMMD_TSV_HEADER)]
        for rel, label in rows.get(split, []):
            n += 1
            if rel is None:
                rel = f"data_image/hurricane_harvey/{10 + n % 3}_9_2017/{900000 + n}_0.jpg"
                files.append((os.path.join(root, rel), n))
            text = f'Tweet "{n}" about the storm'
            out.append("\t".join(["hurricane_harvey", str(900000 + n), f"{900000 + n}_0", text, rel,
                                  label, "not_humanitarian", label, label]))
        write(os.path.join(root, "crisismmd_datasplit_all", f"task_humanitarian_text_img_{split}.tsv"),
              ("\n".join(out) + "\n").encode())
    write_images(files, image, workers)
    return root
