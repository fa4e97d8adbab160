"""The default model is converted once, even when several processes ask at the same time."""

from __future__ import annotations

import threading
import time

from gastune.models import loading


def test_concurrent_first_loads_convert_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GASTUNE_CACHE", str(tmp_path))
    calls = []

    def fake_convert(target):
        calls.append(target)
        time.sleep(0.3)  # long enough for the other caller to arrive while this one converts
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(loading, "_convert_default", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(loading.default_model_dir())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "SmolLM2-135M-Instruct"] * 3
