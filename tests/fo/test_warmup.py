"""The App server's warm-up: torch/open_clip imported on a background thread once the page loads, and the
query path never importing beside it (two threads importing torchvision at once tripped Python's import
deadlock detection in a real App server: the query failed). Fresh interpreters: nothing imported yet."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys, threading
    import __main__
    __main__.__file__ = {main!r}  # what FiftyOne's App server runs
    from fiftyone_dinov2clip import warmup
    warmup.start()
    started = warmup._thread is not None
    seen = {{}}
    def query():  # what the App server's request thread does first: import the zoo model's module
        import fiftyone_dinov2clip.zoo  # noqa: F401
        seen["torch_imported_before_zoo"] = warmup._torch_ready.is_set() if started else None
    t = threading.Thread(target=query)
    t.start()
    t.join()
    warmup.wait(lancedb=True)  # a daemon thread still importing at interpreter exit aborts it
    print(json.dumps({{"started": started, **seen, "torch": "torch" in sys.modules}}))
""")


def run(main: str, **env) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", SCRIPT.format(main=main)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_query_path_waits_for_the_app_servers_warm_up():
    got = run("/venv/lib/python3.11/site-packages/fiftyone/server/main.py")
    assert got == {"started": True, "torch_imported_before_zoo": True, "torch": True}


def test_no_warm_up_outside_the_app_server_or_when_turned_off():
    assert run("/home/user/my_script.py")["started"] is False
    assert run("/venv/lib/python3.11/site-packages/fiftyone/server/main.py", DINOV2CLIP_NO_WARMUP="1")["started"] is False
