"""The operator's status page (``GET /``) of a node and of a verifier sidecar, loaded in a real
headless Chromium against real servers on 127.0.0.1: a node on a tiny model, and a sidecar in
front of it, after real completions. To their operator (the browser sends the operator key, set
through the DevTools protocol), the page names the node, its model and the receipt it just
signed, whose link opens the answer file with its evidence token; the sidecar's names its
upstream and the audit, whose link opens the audit record. Screenshots land in ``tests/screenshots/`` (git-ignored) to look at.

Without Chromium (``/usr/bin/chromium`` and ``/usr/bin/chromedriver``, Debian's ``chromium`` and
``chromium-driver``) the browser tests skip, except in CI (``CI`` set), where they fail: there
``.ci/run`` installs it. The plain HTTP tests (escaping, the API key rule) need no browser.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from node.api.evidence_tokens import receipt_path
from node.api.metrics import TokenRate
from node.api.status_page import MAX_CELL_CHARS
from node.runtime.model_runtime import CacheLimits
from node.sidecar.app import Sidecar, make_sidecar_app
from tests.models_fixtures import make_tiny_hf_checkpoint
from tests.node.api.http_fixtures import audited_node, serving
from verify.identity import NodeKey
from verify.ledger import Ledger

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "screenshots"
LIMITS = CacheLimits(max_batch_size=8, max_total_tokens=2048, prefill_chunk=64)
MODEL = "tiny"
API_KEY = "sk-status-page-test"
OPERATOR_KEY = "sk-status-page-operator"  # the node's and the sidecar's: one browser shows both
HOSTILE = "<script>alert(1)</script>"
PAGE_LOAD_S = 30


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by Debian's chromedriver, named explicitly so Selenium Manager
    downloads nothing; background networking off, since nothing outside loopback is reachable."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        reason = f"Chromium is not installed ({', '.join(missing)} missing; apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the browser tests (.ci/run installs it)")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1440,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_LOAD_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def network(tmp_path_factory, store):
    """A node on the tiny model (no API key: the page's receipt links then open in a browser),
    and a sidecar in front of it that audits every answer; both with the operator key."""
    folder = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("status") / MODEL)
    with audited_node(folder, store, tmp_path_factory.mktemp("status-state"), limits=LIMITS,
                      node_operator_keys=[OPERATOR_KEY], sidecar_operator_keys=[OPERATOR_KEY]) as network:
        yield network


def complete(base_url: str, prompt: str) -> dict:
    """One real completion; its ``proofmesh`` object."""
    response = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "seed": 7},
                          timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["proofmesh"]


def open_page(browser, url: str) -> str:
    """``url`` as the operator sees it: every request of the browser bears the operator key."""
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {OPERATOR_KEY}"}})
    browser.get(url)
    return browser.find_element(By.TAG_NAME, "body").text


def follow(browser, link_text: str) -> dict:
    """Click the link (the page reloads itself every few seconds: find it fresh), and read the
    JSON the browser then shows (Chromium wraps a JSON document in a <pre>)."""
    WebDriverWait(browser, PAGE_LOAD_S).until(lambda d: d.find_elements(By.LINK_TEXT, link_text))
    browser.find_element(By.LINK_TEXT, link_text).click()
    WebDriverWait(browser, PAGE_LOAD_S).until(lambda d: f"/{link_text}" in d.current_url)
    return json.loads(browser.find_element(By.TAG_NAME, "pre").text)


def screenshot(browser, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOTS / name))


# ---------------------------------------------------------------------- in Chromium


def test_node_status_page_shows_the_node_its_model_and_the_receipt_it_signed(browser, network):
    proof = complete(network.node_url, "Once upon a time")
    receipt_id = proof["receipt"]["receipt_id"]
    text = open_page(browser, network.node_url + "/")
    assert browser.title == "ProofMesh node"
    assert network.node_key.node_id in text and network.model.model_id in text and receipt_id in text
    assert MODEL in text and "tokens/s" in text and "no network" in text
    screenshot(browser, "status_page.png")
    answer = follow(browser, receipt_id)
    assert answer["receipt"]["receipt_id"] == receipt_id and answer["receipt"]["node_id"] == network.node_key.node_id
    assert browser.current_url == network.node_url + receipt_path(receipt_id, proof["evidence_token"])


def test_sidecar_status_page_shows_its_upstream_and_the_audit(browser, network):
    receipt_id = complete(network.sidecar_url, "The verifier checks")["receipt"]["receipt_id"]
    deadline = time.monotonic() + 60
    while (audit := network.sidecar.ledger.audit(receipt_id)) is None or audit.state == "pending":
        assert time.monotonic() < deadline, "the audit did not settle"
        time.sleep(0.2)
    assert audit.state == "pass"
    text = open_page(browser, network.sidecar_url + "/")
    assert browser.title == "ProofMesh verifier"
    assert network.sidecar.key.node_id in text and network.node_key.node_id in text and network.node_url in text
    assert receipt_id in text and "pass" in text and "tokens/s" in text
    screenshot(browser, "sidecar_status_page.png")
    record = follow(browser, receipt_id)
    assert record["receipt_id"] == receipt_id and record["state"] == "pass"


# ---------------------------------------------------------------------- plain HTTP


@pytest.fixture
def guarded_sidecar(tmp_path):
    """A sidecar with an API key and an operator key whose ledger holds an audit recorded under a stranger's string
    (a withheld answer is recorded under whatever receipt id the node sent). It serves no request
    here, so any object stands in for its model."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.open_audit(HOSTILE, "<img src=x onerror=alert(2)>", "")
    ledger.close_audit(HOSTILE, "withheld")
    ledger.open_audit("f" * 100_000, "node", "")  # a megabyte-sized "receipt id" would be as cheap to send
    sidecar = Sidecar(["http://127.0.0.1:9"], ledger, NodeKey.generate(), {"a" * 64: SimpleNamespace(name="m", tokenizer=None)}, audit_rate=0.5)
    try:
        with serving(make_sidecar_app(sidecar, api_keys=[API_KEY], operator_keys=[OPERATOR_KEY])) as url:
            yield url
    finally:
        ledger.close()


def test_strangers_text_is_escaped_cut_short_and_never_a_link(guarded_sidecar):
    page = httpx.get(f"{guarded_sidecar}/", headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "&lt;img src=x onerror=alert(2)&gt;" in page.text
    assert "<script" not in page.text and "<img" not in page.text
    assert 'href="v1/audits/' not in page.text  # not a receipt id: shown, not linked
    assert "f" * (MAX_CELL_CHARS - 1) + "…" in page.text and "f" * MAX_CELL_CHARS not in page.text


def test_the_page_is_open_but_shows_the_audits_only_to_the_operator(guarded_sidecar):
    """The /health rule for the page itself (probes and browsers send no key), the audit routes'
    rule (the operator's) for the audits it shows; the JSON error handling of every other route
    is unchanged."""
    for headers in ({}, {"Authorization": f"Bearer {API_KEY}"}):
        page = httpx.get(f"{guarded_sidecar}/", headers=headers)
        assert page.status_code == 200 and "for the operator only" in page.text and "alert" not in page.text
    refused = httpx.get(f"{guarded_sidecar}/v1/audits")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    keyed = httpx.get(f"{guarded_sidecar}/v1/audits", headers={"Authorization": f"Bearer {API_KEY}"})
    assert keyed.status_code == 403 and keyed.json()["error"]["type"] == "permission_error"
    assert httpx.get(f"{guarded_sidecar}/nope").json()["error"]["type"] == "not_found_error"
    assert httpx.post(f"{guarded_sidecar}/").status_code == 405


def test_token_rate_counts_whole_seconds_in_its_window():
    rate = TokenRate(window_s=10)
    rate.add(5, now=100.2)
    rate.add(3, now=100.9)
    rate.add(4, now=105.5)
    assert rate.per_second(now=105.9) == 0.8  # the current second is not over: not counted yet
    assert rate.per_second(now=106.0) == 1.2
    assert rate.per_second(now=111.0) == 0.4  # 100 has left the window [101, 111)
    assert rate.per_second(now=200.0) == 0.0
