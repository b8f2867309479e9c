"""benchmarks/vae.py runs end to end on a few steps and writes its table."""

from benchmarks import vae


def test_tiny_run_writes_the_table(tmp_path):
    out = tmp_path / "vae.md"
    vae.main(["--steps", "3", "--seeds", "1", "--out", str(out)])
    text = out.read_text()
    assert "## Protocol" in text and "−ELBO @ 3" in text
    rows = [line for line in text.splitlines() if line.startswith("| NaturalGradient")
            or line.startswith("| Adam(")]
    assert len(rows) == 1 + len(vae.ADAM_LRS)
    for row in rows:
        loss = float(row.split(" | ")[1])
        assert 10 < loss < 100  # nats per 64-pixel binary image: finite and sensible


def test_seconds_to_target_is_the_time_to_the_first_checkpoint_within_tolerance():
    fit = {"seconds": [1.0, 2.0, 3.0, 4.0], "losses": [30.0, 20.05, 19.0]}
    assert vae.seconds_to(fit, [1, 2, 4], 20.0) == 3.0
    assert vae.seconds_to(fit, [1, 2, 4], 10.0) == float("inf")
