"""tools/predict.py on mesh and cloud files written here, with a model trained in a fixture."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh

from tools.predict import main as predict_main
from tools.predict import run


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    trimesh.creation.icosphere(subdivisions=3, radius=2.0).export(folder / "ball.stl")
    ring = trimesh.creation.torus(major_radius=1.0, minor_radius=0.35)
    ring.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))
    ring.export(folder / "ring.obj")
    np.save(folder / "ring_cloud.npy", np.asarray(ring.sample(3000, seed=0)))
    np.savetxt(folder / "ball.xyz", np.asarray(trimesh.creation.icosphere(3).sample(500, seed=0)) + 5.0)
    return folder


def test_predicts_sphere_and_torus(tiny_run: Path, shapes: Path) -> None:
    records, _ = run(str(tiny_run / "ckpt-best.pth"), [str(shapes)], top_k=3)
    best = {Path(r["file"]).name: r["predictions"][0]["class"] for r in records}
    assert best == {"ball.stl": "sphere", "ball.xyz": "sphere", "ring.obj": "torus", "ring_cloud.npy": "torus"}
    for r in records:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-4)


def test_json_output_and_bad_files(tiny_run: Path, shapes: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "flat.txt").write_text("1 2\n3 4\n")
    (tmp_path / "broken.stl").write_bytes(b"not a mesh")
    code = predict_main(["--ckpt", str(tiny_run / "ckpt-best.pth"), "--json", "--top-k", "1",
                         str(shapes / "ring.obj"), str(tmp_path / "flat.txt"), str(tmp_path / "broken.stl")])
    out, err = capsys.readouterr()
    assert code == 1
    results = json.loads(out)["results"]
    assert results[0]["predictions"][0]["class"] == "torus"
    assert "flat.txt" in results[1]["error"] and "shape (N, 3+)" in results[1]["error"]
    assert "broken.stl" in results[2]["error"]
    assert err.count("error:") == 2 and "Traceback" not in err


def test_missing_path_is_one_line(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert predict_main(["--ckpt", str(tiny_run / "ckpt-best.pth"), str(tmp_path / "nothere.ply")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no such file or folder: {tmp_path / 'nothere.ply'}"
