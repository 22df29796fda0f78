"""mongod killed in the middle of `index` (issue 24): the run ends with one line, and the rerun after a restart
reports counts that add up (an unclean shutdown leaves MongoDB's fast collection count stale: FiftyOne's
`len(dataset)` reads it, docs/upstream/fiftyone-estimated-count-after-crash.md). A real mongod, SIGKILLed, and
the real CLI in its own process."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fiftyone", reason="fiftyone is not installed (pip install '.[fiftyone]')")

from support.devdb import Mongod, isolated_env  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
IMAGES = 120


def embedded_count(port: int, database: str) -> int:
    """Samples holding a CLIP-space embedding, straight from MongoDB (this process never opens FiftyOne's)."""
    import pymongo

    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=2000)
    try:
        db = client[database]
        return sum(db[name].count_documents({"dinov2clip": {"$ne": None}})
                   for name in db.list_collection_names() if name.startswith("samples."))
    except pymongo.errors.PyMongoError:
        return 0
    finally:
        client.close()


def test_mongod_killed_mid_index_gives_one_line_and_a_rerun_whose_counts_add_up(tmp_path, tiny_dir):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(images / f"{i:03d}.jpg")
    home = tmp_path / "home"
    durable = ("--journalCommitInterval", "1")  # the default 100 ms loses what a kill finds just written
    mongod = Mongod(home, args=durable)
    env = {**os.environ, **isolated_env(home, mongod.port, "crash"), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env["FIFTYONE_DATABASE_URI"] += "/?serverSelectionTimeoutMS=3000"  # a dead mongod is noticed in seconds
    cmd = [sys.executable, "-m", "fiftyone_dinov2clip", "index", str(images), "--model", str(tiny_dir),
           "--batch-size", "4"]
    try:
        run = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while (written := embedded_count(mongod.port, "crash")) < 8:  # killed once embeddings are being written
            assert run.poll() is None and time.time() < deadline, run.communicate()
            time.sleep(0.2)
        time.sleep(0.02)  # journalled each millisecond (below): what was written by now survives the kill
        mongod.proc.kill()
        mongod.proc.wait()
        out, err = run.communicate(timeout=300)
        assert run.returncode == 2, (out, err)
        assert "Traceback" not in err and "cannot use its database" in err.strip().splitlines()[-1]

        mongod = Mongod(home, mongod.port, args=durable)  # restarted on the same files: recovered from the journal
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        line = again.stdout.strip().splitlines()[-1]
        assert not re.search(r"(?<![\w.])-\d", line), line
        counts = re.search(r": (\d+) samples; embedded (\d+) images, 0 unreadable \(skipped\), (\d+) already had", line)
        assert counts, line
        total, embedded, existing = map(int, counts.groups())
        assert total == IMAGES and embedded + existing == IMAGES and existing >= written, (line, written)
    finally:
        mongod.stop()
