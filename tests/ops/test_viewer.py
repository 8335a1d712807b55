"""The run viewer in a real headless Chromium, on the page of a short real training run (every
actor real: vLLM generator, sandboxed interpreter, scorer, buffer, scheduler, DeepSpeed learner):
the curves are drawn, the dumped trajectories are listed with their tokens coloured by provenance,
a filter narrows the list, clicking a token shows its log-probs and version. A screenshot goes to
the run directory. Chromium is Debian's (`make test` installs chromium and chromium-driver).
The same run's Prometheus export, scraped while it ran, holds every series the Grafana dashboard names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import PROJECT_ROOT

from cir_actors.learning import dumps
from cir_actors.ops.viewer import build_page, chart_series

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def run(short_run):
    """The shared short real run (tests/conftest.py): its directory and the series scraped while it ran."""
    run_dir, _, scraped = short_run
    return run_dir, scraped


@pytest.fixture(scope="module")
def run_dir(run):
    return run[0]


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        pytest.fail(f"the viewer test needs Debian's chromium and chromium-driver ({', '.join(missing)} missing): "
                    "run `make browser` as root, or `apt-get install chromium chromium-driver`")  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="cir-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1500,1900"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_dumps_and_metrics_of_a_real_run(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        header, recs = dumps.read_step(dumps.dump_path(run_dir, r["step"]))
        assert r["dump/trajectories"] == header["records"] == len(recs) == 6  # 8 trained, 6 asked for
        assert r["dump/bytes"] == dumps.dump_path(run_dir, r["step"]).stat().st_size <= 4_000_000
        assert any(k.startswith("train/turn/turn0/") for k in r) or r["train/trained_trajectories"] == 0
        for rec in recs:
            sampled = rec["provenance"] == dumps.SAMPLED
            # data trained at step s (producing version s) was sampled by versions s-2 or s-1 (staleness <= 1)
            assert sampled.any() and (rec["version"][sampled] >= r["step"] - 2).all()
            assert (rec["version"][sampled] <= r["step"] - 1).all()
            assert (rec["loss_mask"][1:] == sampled[1:]).all()
            assert len(rec["pieces"]) == len(rec["token_ids"])


def _js(x: float) -> str:
    """A number as the page prints it (JavaScript's +x.toFixed(4))."""
    s = f"{float(x):.4f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def test_viewer_in_headless_chromium(run_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page = run_dir / "view.html"
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "entrypoints" / "view.py"), str(run_dir)],
                         check=False, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert page.is_file() and "https://" not in page.read_text()[:2000]
    recs = [r | {"step": s} for s in (1, 2) for r in dumps.read_step(dumps.dump_path(run_dir, s))[1]]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    browser.get(page.as_uri())
    assert browser.execute_script("return document.body.dataset.ready") == "1"
    # curves: one plotly chart per group, each drawn with its traces; reward has a point per step
    charts = chart_series(rows)
    drawn = browser.find_elements(By.CSS_SELECTOR, "#charts .chart .main-svg")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#charts .chart")) == len(charts) >= 10
    assert len(drawn) >= len(charts)
    reward = browser.find_element(By.CSS_SELECTOR, '#charts .chart[data-title="reward and accuracy"]')
    assert len(reward.find_elements(By.CSS_SELECTOR, ".scatterlayer .trace")) == 2
    assert len(reward.find_elements(By.CSS_SELECTOR, ".scatterlayer .trace:first-child .point")) == 2
    titles = [c.get_attribute("data-title") for c in browser.find_elements(By.CSS_SELECTOR, "#charts .chart")]
    assert {"staleness (versions)", "conservation counts (groups)", "throughput", "trajectory dumps"} <= set(titles)
    if any("train/clip_frac_low" in r for r in rows):  # a step trained something (the tiny model rarely scores)
        assert {"clip fractions", "mismatch KL by turn"} <= set(titles)

    # the list holds every dumped trajectory; a filter narrows it to what the dumps say
    list_rows = lambda: browser.find_elements(By.CSS_SELECTOR, "#traj-list tbody tr")
    assert len(list_rows()) == len(recs) == 12
    Select(browser.find_element(By.ID, "f-step")).select_by_value("2")
    assert len(list_rows()) == 6 and all(r.find_element(By.TAG_NAME, "td").text == "2" for r in list_rows())
    kind = recs[0]["kind"]
    Select(browser.find_element(By.ID, "f-step")).select_by_value("")
    Select(browser.find_element(By.ID, "f-kind")).select_by_value(kind)
    assert len(list_rows()) == sum(r["kind"] == kind for r in recs)
    Select(browser.find_element(By.ID, "f-kind")).select_by_value("")

    # the first trajectory is shown: tokens coloured by provenance
    list_rows()[0].click()
    t = recs[0]
    spans = browser.find_elements(By.CSS_SELECTOR, "#traj-detail .tok")
    assert len(spans) == len(t["token_ids"])
    prompt = browser.find_element(By.CSS_SELECTOR, "#traj-detail .tok.p0")
    sampled = browser.find_elements(By.CSS_SELECTOR, "#traj-detail .tok.p1")
    assert len(sampled) == int((t["provenance"] == dumps.SAMPLED).sum())
    assert sampled[0].value_of_css_property("background-color") == "rgba(226, 236, 255, 1)"
    assert prompt.value_of_css_property("background-color") != sampled[0].value_of_css_property("background-color")

    # clicking a sampled token shows its behaviour / proximal log-probs and its version
    i = int(sampled[len(sampled) // 2].get_attribute("data-i"))
    sampled[len(sampled) // 2].click()
    detail = browser.find_element(By.ID, "token-detail").text
    assert f"token {i} " in detail and f"id {int(t['token_ids'][i])}" in detail
    assert f"behaviour {_js(t['behaviour_logprob'][i])} " in detail
    assert f"proximal {_js(t['proximal_logprob'][i])} " in detail
    assert f"version {int(t['version'][i])}" in detail
    browser.save_screenshot(str(run_dir / "viewer.png"))
    assert (run_dir / "viewer.png").stat().st_size > 20_000


def test_page_without_a_run_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="neither metrics.jsonl nor trajectories"):
        build_page(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_page(tmp_path / "nope")


def test_grafana_dashboard_names_only_series_the_run_exported(run):
    """Every panel query of configs/grafana/ names a series scraped from the real run's endpoint."""
    _, scraped = run
    dash = json.loads((PROJECT_ROOT / "configs" / "grafana" / "cir_actors_dashboard.json").read_text())
    assert len(dash["panels"]) >= 12
    missing = {}
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = re.findall(r"\b(ray_cir_[a-z0-9_]+?)(?:_bucket)?\b", target["expr"])
            assert names, (panel["title"], target["expr"])
            # Every series is filtered by the dashboard's run (Ray namespace) variable.
            assert len(re.findall(r'ray_cir_[a-z0-9_]+\{run=~"\$run"', target["expr"])) == len(names), target["expr"]
            missing.update({n: panel["title"] for n in names if n not in scraped})
    assert not missing, f"panels name series the run never exported: {missing} (scraped: {sorted(scraped)})"
