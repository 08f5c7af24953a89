"""Data at scale: tar shards and image folders split across ranks and workers, bad samples skipped."""
import io
import json
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import write_shards


def _png(i=0, size=32):
    return data.encode_image(data.draw(data.make_scene(i, image_size=size)))


def _samples(n, bad_every=0):
    """n samples with unique captions; with bad_every, some corrupt images and missing captions."""
    good, out = [], []
    for i in range(n):
        sample = {"__key__": f"{i:06d}", "png": _png(i), "txt": f"sample {i}", "json": b"{}"}
        if bad_every and i % bad_every == 3:
            sample["png"] = b"\x89PNG garbage"
        elif bad_every and i % bad_every == 5:
            del sample["txt"]
        else:
            good.append(f"sample {i}")
        out.append(sample)
    return out, good


@pytest.mark.parametrize("split_by", ["shard", "sample"])
def test_every_good_sample_is_read_once_across_ranks_and_workers(tmp_path, split_by):
    samples, good = _samples(96, bad_every=8)
    paths = write_shards(samples, str(tmp_path), per_shard=12)  # 8 shards
    seen = []
    for rank in range(2):
        ds = data.TarShards(paths, rank=rank, world_size=2, split_by=split_by)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        for image, caption in loader:
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            seen.append(caption)
    assert sorted(seen) == sorted(good)
    # the same four readers in-process (rank r of 4 == rank r // 2, worker r % 2): bad ones counted once
    skipped, ok = {}, 0
    for reader in range(4):
        ds = data.TarShards(paths, rank=reader, world_size=4, split_by=split_by)
        list(ds)
        ok += ds.stats["ok"]
        for reason, n in ds.stats["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert ok == len(good) and skipped == {"bad_image": 12, "missing_caption": 12}


def test_caption_problems_and_missing_images_are_counted(tmp_path):
    samples = [
        {"__key__": "a", "jpg": data.encode_image(data.draw(data.make_scene(0)), "JPEG"), "txt": "fine"},
        {"__key__": "b", "png": _png(1), "txt": b"\xff\xfe not utf-8"},
        {"__key__": "c", "png": _png(2), "txt": "   "},
        {"__key__": "d", "txt": "no image"},
        {"__key__": "e", "png": b"", "txt": "zero bytes"},
        {"__key__": "f", "png": _png(3) + bytes(10_000), "txt": "big member"},
    ]
    paths = write_shards(samples, str(tmp_path), per_shard=10)
    ds = data.TarShards(paths, max_member_bytes=5_000)
    assert [c for _, c in ds] == ["fine"]
    assert ds.stats == {"ok": 1, "skipped": {"bad_caption": 1, "empty_caption": 1, "missing_image": 1,
                                             "empty_image": 1, "too_large": 1}}


def test_resume_continues_where_it_stopped(tmp_path):
    samples, good = _samples(30, bad_every=7)
    paths = write_shards(samples, str(tmp_path), per_shard=8)
    full = [c for _, c in data.TarShards(paths)]
    ds = data.TarShards(paths)
    it = iter(ds)
    first = [next(it)[1] for _ in range(10)]
    state = ds.state_dict()
    resumed = data.TarShards(paths)
    resumed.load_state_dict(state)
    assert first + [c for _, c in resumed] == full
    assert [c for _, c in resumed] == full  # the next pass starts from the beginning again
    assert [c for _, c in data.TarShards(paths, start=state["position"])] == full[10:]


def test_all_bad_raises_a_clear_error(tmp_path):
    samples = [{"__key__": f"{i}", "png": b"junk", "txt": "x"} for i in range(5)]
    paths = write_shards(samples, str(tmp_path), per_shard=5)
    with pytest.raises(RuntimeError, match="no readable samples"):
        list(data.TarShards(paths))
    bogus = tmp_path / "bogus.tar"
    bogus.write_bytes(b"not a tar at all")
    with pytest.raises(RuntimeError, match="no readable samples"):
        list(data.TarShards([str(bogus)]))


def test_fuzz_malformed_images_never_crash(tmp_path):
    rng = random.Random(0)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    valid = data.encode_image(noise)  # incompressible: cutting 40 bytes off loses pixel data
    blobs = [b""] + [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) for _ in range(100)]
    blobs += [valid[:rng.randint(1, len(valid) - 40)] for _ in range(60)]  # truncated PNGs
    blobs += [valid[:40] + bytes(rng.getrandbits(8) for _ in range(200)) for _ in range(40)]  # bad body
    assert len(blobs) >= 200
    for blob in blobs:
        image, reason = data.decode_image(blob, 32)
        assert image is None and reason in ("empty_image", "bad_image", "too_large")
    # the same bytes inside a shard: every one skipped and counted, the one good sample kept
    samples = [{"__key__": f"{i:04d}", "png": b, "txt": "bad"} for i, b in enumerate(blobs)]
    samples.append({"__key__": "good", "png": valid, "txt": "good"})
    ds = data.TarShards(write_shards(samples, str(tmp_path), per_shard=1000))
    assert [c for _, c in ds] == ["good"]
    assert sum(ds.stats["skipped"].values()) == len(blobs)


def test_fuzz_malformed_shards_never_crash(tmp_path):
    rng = random.Random(1)
    samples, _ = _samples(6)
    (valid,) = write_shards(samples, str(tmp_path / "valid"), per_shard=10)
    raw = open(valid, "rb").read()
    files = []
    for i in range(240):
        kind = i % 3
        if kind == 0:  # random bytes
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2000)))
        elif kind == 1:  # a valid tar cut anywhere
            blob = raw[:rng.randint(0, len(raw) - 1)]
        else:  # a valid tar whose member bytes are overwritten with garbage (headers intact)
            blob = bytearray(raw)
            for _ in range(20):
                start = rng.randrange(0, len(blob) - 64)
                if start % 512 > 16:  # keep header blocks' beginnings so it still parses as a tar
                    blob[start:start + 32] = bytes(rng.getrandbits(8) for _ in range(32))
            blob = bytes(blob)
        path = tmp_path / f"fuzz-{i:03d}.tar"
        path.write_bytes(blob)
        files.append(str(path))
    total_ok = total_skipped = 0
    for path in files:
        ds = data.TarShards([path])
        try:
            for image, caption in ds:
                assert image.shape == (3, 32, 32) and isinstance(caption, str)
        except RuntimeError as err:  # nothing readable in that file: allowed, and it says so
            assert "no readable samples" in str(err)
        total_ok += ds.stats["ok"]
        total_skipped += sum(ds.stats["skipped"].values())
        if path.endswith(("000.tar", "003.tar")):  # random bytes: one bad shard, nothing else
            assert ds.stats == {"ok": 0, "skipped": {"bad_shard": 1}}
    assert total_skipped >= 160 and total_ok > 0
    # one reader over all of them plus the valid shard: no crash, the valid samples all come through
    ds = data.TarShards(files + [valid])
    assert sum(1 for _ in ds) >= 6


def _png_with_header_size(width, height):
    """A tiny PNG whose header claims width x height: a decompression bomb in a few bytes."""
    raw = bytearray(_png(0))
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])))
    return bytes(raw)


def test_huge_images_are_refused_from_the_header():
    assert data.decode_image(_png_with_header_size(100_000, 100_000), 32) == (None, "too_large")
    assert data.decode_image(_png_with_header_size(5000, 5000), 32) == (None, "too_large")
    assert data.decode_image(_png(0), 32, max_pixels=100) == (None, "too_large")


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "P+transparency", "CMYK", "1", "I;16", "I", "F",
                                  "YCbCr"])
def test_non_rgb_modes_decode_to_rgb(mode):
    rgb = Image.fromarray(data.draw(data.make_scene(0)))
    if mode == "I;16":
        im = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    else:
        im = rgb.convert(mode.split("+")[0])
    fmt = "PNG" if mode in ("L", "RGBA", "LA", "P", "P+transparency", "1", "I;16") else (
        "JPEG" if mode == "YCbCr" else "TIFF")
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"transparency": 0} if mode == "P+transparency" else {}))
    image, reason = data.decode_image(buf.getvalue(), 16)
    assert reason is None and image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert 0.3 < float(image.mean()) < 0.7  # grey background: scaled correctly, not all 0 or all 1


def test_resize_and_centre_crop():
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # a white square in the middle of a black strip
    image, _ = data.decode_image(data.encode_image(wide), 10)
    assert image.shape == (3, 10, 10) and float(image.mean()) > 0.95


def test_image_folder_captions(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "bad.png").write_bytes(b"nope")
    lines = [json.dumps({"file": f"{i}.png", "caption": f"c{i}"}) for i in range(4)]
    lines += [json.dumps({"file": "bad.png", "caption": "x"}), json.dumps({"file": "gone.png", "caption": "y"}),
              json.dumps({"file": "0.png", "caption": ""}), "{not json", json.dumps({"caption": "no file"})]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(lines) + "\n")
    ds = data.ImageFolderCaptions(str(tmp_path), str(captions))
    assert [c for _, c in ds] == ["c0", "c1", "c2", "c3"]
    assert ds.stats == {"ok": 4, "skipped": {"bad_image": 1, "missing_image": 1, "empty_caption": 1,
                                             "bad_record": 2}}
    halves = [[c for _, c in data.ImageFolderCaptions(str(tmp_path), str(captions), rank=r, world_size=2)]
              for r in range(2)]
    assert sorted(halves[0] + halves[1]) == ["c0", "c1", "c2", "c3"]
