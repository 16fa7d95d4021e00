"""The page on GET /, in a real browser: Playwright driving Debian's chromium (no browser download).

A 3-peer cluster (memory limits force a 3-peer ring) shows 3 peers with their layer ranges; a question
gets a streamed answer; a keyed peer asks for the key once and keeps it. Screenshots land in the test's
tmp dir (paths printed; run with -s to see them).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.harness import AgentProcess, three_peers_and_a_keyed_gateway, wait_for

CHROMIUM = "/usr/bin/chromium"
MODEL = "smollm2-135m"
LIMIT = "100M"  # as in test_ring_api: SmolLM2 then needs a ring of three
LIMIT_BYTES = int(LIMIT.rstrip("M")) * 2**20
API_KEY = "page-test-key"

sync_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("page")
    with three_peers_and_a_keyed_gateway(work, LIMIT, API_KEY, ready_timeout=120) as agents:
        a, b, c = agents["a"], agents["b"], agents["c"]
        ids = {a.peer_id, b.peer_id, c.peer_id}
        wait_for(lambda: ids <= a.view(), 60, what="a to see all peers")

        def ready_to_compute(x: AgentProcess) -> bool:  # full records, not only heartbeats, of all three
            peers = x.get("/v1/cluster")["peers"]
            return (
                sum(1 for p in peers if MODEL in p["models"] and p["memory_free"] >= 0.9 * LIMIT_BYTES) >= 3
            )

        for x in (a, b):
            wait_for(lambda x=x: ready_to_compute(x), 90, what=f"{x.name} to see 3 computing peers")
        yield {**agents, "work": work}


def until(predicate, timeout: float, what: str):
    """Poll from Python: page.wait_for_function evaluates strings, which the page's CSP (no eval) forbids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def layered_peers(page) -> int:
    return sum(1 for p in page.locator("#peers .peer").all() if p.locator(".bar.layers .seg").count())


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_page_streams_an_answer_and_maps_the_ring(cluster, browser, tmp_path):
    a = cluster["a"]
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests_seen: list[str] = []
    page.on("request", lambda r: requests_seen.append(r.url))
    page.goto(a.url + "/")
    until(lambda: page.locator("#peers .peer").count() >= 4, 60, "4 peers on the map")
    assert page.locator("#model option").first.get_attribute("value") == MODEL
    assert page.input_value("#temperature") == "0.8" and page.input_value("#min_p") == "0.05"
    page.screenshot(path=str(tmp_path / "1-loaded.png"), full_page=True)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    # the answer grows token by token while it streams
    answer = page.locator("#messages .msg.assistant .text").last
    lengths: list[int] = []
    deadline = time.monotonic() + 600
    shot_mid = shot_loading = False
    while time.monotonic() < deadline:
        n = len(answer.text_content() or "")
        if not n and not shot_loading and page.locator("#peers .seg.loading").count():
            page.screenshot(path=str(tmp_path / "2a-loading.png"), full_page=True)  # when a poll caught it
            shot_loading = True
        if not lengths or n != lengths[-1]:
            lengths.append(n)
        if n and not shot_mid:
            page.screenshot(path=str(tmp_path / "2-streaming.png"), full_page=True)
            shot_mid = True
        if page.text_content("#send") == "Send" and n:
            break
        time.sleep(0.05)
    text = answer.text_content()
    assert "Paris" in text, (text, a.get("/v1/cluster"))
    assert len([n for n in lengths if n]) >= 3, f"answer did not stream: lengths seen {lengths}"
    assert "tok/s" in page.text_content("#messages .msg.assistant .stats")
    # the map: 3 computing peers, each with a layer range, together covering the model; the request row
    def layer_labels() -> list[str]:
        labels = page.locator("#peers .peer .barlabel").all_text_contents()
        return [t for t in labels if t.startswith(MODEL + ": layers [")]

    # a peer's record can still say "loading ... 100%" for a moment after the answer: wait for held ranges
    until(lambda: layered_peers(page) >= 3 and len(layer_labels()) == 3, 30, "3 peers holding layers on the map")
    layer_labels = layer_labels()
    assert len(layer_labels) == 3, layer_labels
    ranges = sorted(tuple(int(x) for x in t.split("[")[1].split(")")[0].split(",")) for t in layer_labels)
    assert ranges[0][0] == 0 and ranges[-1][1] == 30 and all(
        ranges[i][1] == ranges[i + 1][0] for i in range(2)), ranges  # fmt: skip
    assert "gateway" in page.text_content("#peers")
    row = page.locator("#requests tbody tr").first
    until(
        lambda: "done" in row.text_content(), 10, "the request row to show done"
    )  # the map polls each second
    assert row.locator("td").nth(2).text_content().count("→") == 2  # a ring of three
    page.screenshot(path=str(tmp_path / "3-answered.png"), full_page=True)
    print("screenshots:", tmp_path)
    assert not errors, errors
    assert all(u.startswith(a.url) for u in requests_seen), "the page loads nothing from elsewhere"


def test_page_asks_for_the_key_once(cluster, browser, tmp_path):
    gw = cluster["gw"]
    wait_for(lambda: cluster["a"].peer_id in cluster["a"].view(), 10)
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(gw.url + "/")
    page.wait_for_selector("#keydlg", state="visible", timeout=30_000)
    page.screenshot(path=str(tmp_path / "4-key.png"))
    page.fill("#keyinput", API_KEY)
    page.click("#keyform button")
    until(lambda: page.locator("#peers .peer").count() >= 4, 60, "4 peers on the keyed page")
    stored = {i["name"]: i["value"] for o in ctx.storage_state()["origins"] for i in o["localStorage"]}
    assert stored.get("p2pinfer.apikey") == API_KEY
    page.reload()
    until(lambda: page.locator("#peers .peer").count() >= 4, 60, "4 peers after a reload")
    assert not page.is_visible("#keydlg")
    page.screenshot(path=str(tmp_path / "5-keyed.png"), full_page=True)
    ctx.close()


def test_logprobs_and_penalties_cross_a_three_peer_ring(cluster):
    """The last member samples: logprobs come back from it, and penalties see the prompt's tail it never saw."""
    import openai

    c = openai.OpenAI(base_url=cluster["b"].url + "/v1", api_key="x", timeout=600, max_retries=0)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name three colours."}],
                                  max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    prompt = "one, one, one, one, one, one, one,"
    plain = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    pen = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                               presence_penalty=2.0).choices[0].text  # fmt: skip
    assert pen.count("one") < plain.count("one"), (plain, pen)
    ring = c.with_options().models.list()  # the API still answers
    assert MODEL in [m.id for m in ring.data]
    reqs = cluster["b"].get("/v1/requests")["data"]
    assert all(len(x["ring"]) == 3 for x in reqs if x["state"] == "done"), reqs


def test_page_shows_loading_progress_memory_and_rings_in_use(cluster, browser, tmp_path):
    """States that last a moment in a real run (a range loading, a ring in use) drawn from the real cluster's
    answers with such a state added (Playwright rewrites /v1/cluster and /v1/models on their way to the page)."""
    a = cluster["a"]
    real = a.get("/v1/cluster")
    held = {p["peer_id"]: p["layers"] for p in real["peers"] if p["layers"]}
    assert len(held) == 3, real  # after the first test's request: three peers, a range each
    ring = sorted(([pid, s, e] for pid, layers in held.items() for _, s, e in layers), key=lambda m: m[1])
    loader = ring[0][0]  # this peer also loads the next peer's range, 40 % of the way
    _, s2, e2 = ring[1]
    rid = "chatcmpl-pagetest0001"

    def cluster_with_states(route):
        resp = route.fetch()
        data = resp.json()
        data["rings"][rid] = ring
        for p in data["peers"]:
            if p["peer_id"] == loader:
                p["loading"] = [[MODEL, s2, e2, 0.4]]
        route.fulfill(response=resp, json=data)

    def models_with_sizes(route):
        resp = route.fetch()
        data = resp.json()
        for m in data["data"]:
            m.update(layer_bytes=2**20, embed_bytes=8 * 2**20, head_bytes=8 * 2**20, embed_reuses_head=True)
        route.fulfill(response=resp, json=data)

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.route("**/v1/cluster", cluster_with_states)
    page.route("**/v1/models", models_with_sizes)
    page.goto(a.url + "/")
    until(lambda: page.locator("#peers .seg.loading").count() == 1, 30, "the loading range on the map")
    card = page.locator(f'#peers .peer[data-peer="{loader}"]')
    assert "loading 40%" in card.locator(".tag.load").text_content()
    seg = card.locator(".seg.loading")
    assert seg.text_content() == f"loading {s2}–{e2} · 40%"
    assert "width:40%" in seg.locator(".fill").get_attribute("style").replace(" ", "")
    assert f"loading [{s2}, {e2}) 40%" in card.locator(".barlabel").last.text_content()
    for pid, s, e in ring:  # every member of the ring in use is marked, on the range the ring uses
        c = page.locator(f'#peers .peer[data-peer="{pid}"]')
        assert c.locator(".tag.ring").text_content() == "in 1 ring"
        busy = c.locator(".seg.busy")
        assert busy.count() == 1 and busy.text_content() == f"{s}–{e}"
        assert rid[-8:] in busy.get_attribute("title")
        # memory: what its layers use (from the model's sizes) and what it still offers
        used = (e - s) * 2**20 + (8 * 2**20 if s == 0 else 0) + (8 * 2**20 if e == 30 else 0)
        assert f"memory: {used // 2**20} MiB used by layers" in c.locator(".barlabel").first.text_content()
    assert "1 ring(s) in use" in page.text_content("#clusterinfo")
    page.screenshot(path=str(tmp_path / "6-loading-rings.png"), full_page=True)
    page.close()
