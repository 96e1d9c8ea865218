"""The rating page in a real browser (Debian's Chromium, headless, driven by Playwright); scores.json is
checked on disk after each step. Screenshots of the grid and the full-screen view go to tests/artifacts/."""

import json
import os
import time

import pytest
from playwright.sync_api import expect, sync_playwright
from score_round import CHROMIUM, CHROMIUM_ARGS, read_json, serving, write_json, write_round

ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
SEEDS = [3, 8, 15, 21, 42, 77]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"needs Debian's Chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    script_errors = []
    page.on("pageerror", lambda error: script_errors.append(error))
    yield page
    context.close()
    assert script_errors == []


@pytest.fixture
def samples(tmp_path):
    folder = tmp_path / "samples"
    write_round(folder, SEEDS)
    return folder


def expect_on_disk(path, expected, timeout=5.0):
    """The page saves in the background: wait for scores.json to hold `expected`, then check it does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if read_json(path) == expected:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    assert read_json(path) == expected


def badges(page):
    """{seed: badge text} of the grid's scored tiles."""
    return {tile.get_attribute("title").removeprefix("seed "): tile.locator(".badge").text_content()
            for tile in page.locator(".tile").all() if tile.locator(".badge").is_visible()}


def expect_viewer_on(page, seed, position):
    expect(page.locator("#viewer-seed")).to_have_text(str(seed))
    expect(page.locator("#viewer-position")).to_contain_text(f"{position} of {len(SEEDS)}")


def screenshot(page, name):
    page.wait_for_function("[...document.images].every((image) => image.complete)")
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, name))


def test_rate_with_keys_and_buttons_reload_and_filter(page, samples):
    scores_path = samples / "scores.json"
    write_json(scores_path, {"3.png": 2, "old.png": -4})  # the original WebApp's format; old.png is not in this round
    on_disk = {"3.png": 2, "old.png": -4}
    with serving(samples, scores_path) as url:
        page.goto(url)
        expect(page.locator("#counter")).to_have_text("6 loaded / 1 scored")
        expect(page.locator(".tile img").first).to_have_attribute("loading", "lazy")
        assert badges(page) == {"3": "+2"}
        expect(page.locator(".tile .badge").first).to_have_class("badge positive")

        page.keyboard.press("Enter")  # opens the first unscored image
        expect(page.locator("#viewer")).to_be_visible()
        expect_viewer_on(page, 8, 2)
        expect(page.locator("#viewer-prompt")).to_have_text("a neon sign <lora:ui_lora_epoch_10:1>")
        expect(page.locator("#viewer-lora")).to_have_text("ui_lora_epoch_10:1")

        page.keyboard.press("ArrowUp")
        page.keyboard.press("ArrowUp")
        expect(page.locator("#viewer-score")).to_have_text("+2")
        expect_on_disk(scores_path, on_disk | {"8.png": 2})
        for _ in range(6):  # stops at +5
            page.keyboard.press("ArrowUp")
        expect(page.locator("#viewer-score")).to_have_text("+5")
        expect_on_disk(scores_path, on_disk | {"8.png": 5})

        page.keyboard.press("Digit4")  # rate and go on
        expect_viewer_on(page, 15, 3)
        on_disk["8.png"] = 4
        expect_on_disk(scores_path, on_disk)
        page.keyboard.press("Shift+Digit3")
        expect_viewer_on(page, 21, 4)
        on_disk["15.png"] = -3
        expect_on_disk(scores_path, on_disk)

        page.click("#vote-down")
        expect(page.locator("#viewer-score")).to_have_text("−1")
        expect_on_disk(scores_path, on_disk | {"21.png": -1})
        for _ in range(3):
            page.click("#vote-up")
        expect(page.locator("#viewer-score")).to_have_text("+2")
        on_disk["21.png"] = 2
        expect_on_disk(scores_path, on_disk)

        page.keyboard.press("ArrowLeft")
        expect_viewer_on(page, 15, 3)
        expect(page.locator("#viewer-score")).to_have_class("score-value negative")
        page.wait_for_function("document.getElementById('viewer-image').naturalWidth > 0")
        screenshot(page, "score_viewer.png")
        page.keyboard.press("Delete")
        expect(page.locator("#viewer-score")).to_have_text("–")
        expect_on_disk(scores_path, {k: v for k, v in on_disk.items() if k != "15.png"})
        page.keyboard.press("Shift+Digit5")
        on_disk["15.png"] = -5
        expect_on_disk(scores_path, on_disk)

        page.keyboard.press("Escape")
        expect(page.locator("#viewer")).to_be_hidden()
        expect(page.locator("#counter")).to_have_text("6 loaded / 4 scored")
        expect(page.locator("#save-status")).to_have_text("All changes saved")

        page.reload()
        expect(page.locator("#counter")).to_have_text("6 loaded / 4 scored")
        assert badges(page) == {"3": "+2", "8": "+4", "15": "−5", "21": "+2"}
        expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "67")
        screenshot(page, "score_grid.png")

        page.check("#only-unscored")
        expect(page.locator(".tile:visible")).to_have_count(2)
        assert [tile.get_attribute("title") for tile in page.locator(".tile:visible").all()] == ["seed 42", "seed 77"]
        page.locator(".tile:visible").first.click()
        expect_viewer_on(page, 42, 5)
        page.keyboard.press("ArrowLeft")  # the images before it are scored, so the filter leaves nothing there
        expect_viewer_on(page, 42, 5)
        page.keyboard.press("Digit1")
        expect_viewer_on(page, 77, 6)
        page.keyboard.press("Numpad0")
        expect(page.locator("#viewer-position")).to_contain_text("no more unscored")
        on_disk |= {"42.png": 1, "77.png": 0}
        expect_on_disk(scores_path, on_disk)
        page.keyboard.press("Escape")
        expect(page.locator(".tile:visible")).to_have_count(0)
        expect(page.locator("#all-done")).to_be_visible()
        page.uncheck("#only-unscored")
        expect(page.locator(".tile:visible")).to_have_count(6)
        expect(page.locator("#counter")).to_have_text("6 loaded / 6 scored")
    assert read_json(scores_path) == on_disk


def test_download_gives_the_saved_scores(page, samples):
    write_json(samples / "scores.json", {"42.png": -2})
    with serving(samples, samples / "scores.json") as url:
        page.goto(url)
        page.locator(".tile").nth(1).click()
        page.keyboard.press("Digit3")
        expect_on_disk(samples / "scores.json", {"42.png": -2, "8.png": 3})
        page.keyboard.press("Escape")
        with page.expect_download() as download:
            page.click("#download")
        assert download.value.suggested_filename == "scores.json"
        assert json.loads(open(download.value.path()).read()) == {"42.png": -2, "8.png": 3}


def test_a_refused_save_is_shown(page, samples):
    with serving(samples, samples / "scores.json") as url:
        page.goto(url)
        page.locator(".tile").first.click()
        os.remove(samples / "3.png")  # gone from the round after the page loaded
        page.keyboard.press("ArrowUp")
        expect(page.locator("#save-status")).to_contain_text("Not saved: '3.png' is not an image of this round")
    assert not (samples / "scores.json").exists()


def test_an_invalid_scores_json_shows_a_notice(page, samples):
    (samples / "scores.json").write_text('{"3.png": 2')
    with serving(samples, samples / "scores.json") as url:
        page.goto(url)
        expect(page.locator("#notice")).to_be_visible()
        expect(page.locator("#notice")).to_contain_text("scores.json.invalid-")
        expect(page.locator("#counter")).to_have_text("6 loaded / 0 scored")


def test_an_empty_folder_says_what_to_run(page, tmp_path):
    (tmp_path / "samples").mkdir()
    with serving(tmp_path / "samples", tmp_path / "samples" / "scores.json") as url:
        page.goto(url)
        expect(page.locator("#empty")).to_be_visible()
        expect(page.locator("#empty")).to_contain_text("python generate.py")
        expect(page.locator("#empty-folder")).to_have_text(str(tmp_path / "samples"))
        expect(page.locator(".tile")).to_have_count(0)
        screenshot(page, "score_empty.png")


def test_images_far_below_are_not_loaded_until_scrolled_to(page, tmp_path):
    folder = tmp_path / "samples"
    write_round(folder, range(240))
    requested = []
    page.on("request", lambda request: requested.append(request.url) if "/images/" in request.url else None)
    with serving(folder, folder / "scores.json") as url:
        page.goto(url)
        expect(page.locator(".tile")).to_have_count(240)
        page.wait_for_load_state("networkidle")
        assert 0 < len(requested) < 200
        page.locator(".tile").last.scroll_into_view_if_needed()
        page.wait_for_function("document.querySelector('.tile:last-child img').complete")
        assert any(url.endswith("/images/239.png") for url in requested)


# ---------------------------------------------------------------- comparing pairs, and the order option

def shown_pair(page):
    """(a, b): the files of the left and right image in the comparison view, once the first pair has come."""
    page.wait_for_function("document.getElementById('compare-image-b').getAttribute('src') !== null")
    sources = [page.locator(f"#compare-image-{side}").get_attribute("src") for side in ("a", "b")]
    return tuple(source.removeprefix("images/") for source in sources)


def expect_new_pair(page, previous):
    page.wait_for_function("(previous) => document.getElementById('compare-image-a').getAttribute('src') + ' ' + "
                           "document.getElementById('compare-image-b').getAttribute('src') !== previous",
                           arg=" ".join(f"images/{name}" for name in previous))
    return shown_pair(page)


def test_compare_pairs_with_the_arrow_keys_saved_at_once_and_after_a_reload(page, samples):
    comparisons_path = samples / "comparisons.json"
    with serving(samples, samples / "scores.json") as url:
        page.goto(url)
        expect(page.locator("#counter")).to_have_text("6 loaded / 0 scored")
        page.keyboard.press("c")
        expect(page.locator("#compare")).to_be_visible()
        expect(page.locator("#compare-count")).to_have_text("0 comparisons saved")
        first = shown_pair(page)
        assert first[0] != first[1] and {f"{s}.png" for s in SEEDS} >= set(first)
        expect(page.locator("#compare-seed-a")).to_have_text(f"seed {first[0].removesuffix('.png')}")
        page.wait_for_function("document.getElementById('compare-image-b').naturalWidth > 0")
        screenshot(page, "score_compare.png")

        page.keyboard.press("ArrowLeft")  # the left one is better
        on_disk = [{"a": first[0], "b": first[1], "winner": "a"}]
        expect_on_disk(comparisons_path, on_disk)
        second = expect_new_pair(page, first)
        page.keyboard.press("ArrowRight")
        on_disk.append({"a": second[0], "b": second[1], "winner": "b"})
        expect_on_disk(comparisons_path, on_disk)
        third = expect_new_pair(page, second)
        page.keyboard.press("ArrowDown")  # about the same
        on_disk.append({"a": third[0], "b": third[1], "winner": "tie"})
        expect_on_disk(comparisons_path, on_disk)
        expect(page.locator("#compare-count")).to_have_text("3 comparisons saved")
        assert len({frozenset(p) for p in (first, second, third)}) == 3, "a pair was asked twice"
        page.keyboard.press("Escape")
        expect(page.locator("#compare")).to_be_hidden()
        expect(page.locator("#save-status")).to_have_text("All changes saved")

        page.reload()
        page.click("#compare-open")
        expect(page.locator("#compare-count")).to_have_text("3 comparisons saved")
        pair = shown_pair(page)
        for _ in range(12):  # 6 images make 15 pairs; each is asked once, then the view says there are none left
            assert frozenset(pair) not in {frozenset((c["a"], c["b"])) for c in on_disk}
            page.keyboard.press("ArrowDown")
            on_disk.append({"a": pair[0], "b": pair[1], "winner": "tie"})
            expect(page.locator("#compare-count")).to_have_text(f"{len(on_disk)} comparisons saved")
            if len(on_disk) < 15:
                pair = expect_new_pair(page, pair)
        expect(page.locator("#compare-done")).to_be_visible()
        page.keyboard.press("ArrowLeft")  # nothing to answer: nothing is saved
        expect(page.locator("#save-status")).to_have_text("All changes saved")
    assert read_json(comparisons_path) == on_disk
    assert not (samples / "scores.json").exists(), "comparing wrote scores"


def test_a_refused_comparison_is_shown_and_nothing_is_saved(page, samples):
    with serving(samples, samples / "scores.json") as url:
        page.goto(url)
        expect(page.locator("#counter")).to_have_text("6 loaded / 0 scored")  # the page's keys are ready
        page.keyboard.press("c")
        a, _ = shown_pair(page)
        os.remove(samples / a)  # gone from the round after the pair was shown
        page.keyboard.press("ArrowLeft")
        expect(page.locator("#save-status")).to_contain_text(f"Not saved: '{a}' is not an image of this round")
    assert not (samples / "comparisons.json").exists()


def write_order(folder, stds):
    """rating_order.json as train_reward writes it, with these stds {seed: std}; most informative first."""
    entries = [{"file": f"{seed}.png", "mean": 0.0, "std": std, "members": [-std, std]} for seed, std in stds.items()]
    write_json(folder / "rating_order.json", {"reward_model": "models/reward_model.safetensors", "ensemble_size": 2,
                                              "images": sorted(entries, key=lambda e: -e["std"])})


def grid_seeds(page):
    return [int(tile.get_attribute("title").removeprefix("seed ")) for tile in page.locator(".tile").all()]


def test_most_informative_first_orders_the_grid_and_the_keys_and_survives_a_reload(page, samples):
    write_order(samples, {3: 0.1, 8: 0.5, 15: 0.05, 21: 0.9, 42: 0.3})  # 77.png has no saved latent: last
    write_json(samples / "scores.json", {"21.png": 3})
    with serving(samples, samples / "scores.json") as url:
        page.goto(url)
        expect(page.locator(".tile")).to_have_count(len(SEEDS))
        expect(page.locator("#order")).to_have_value("seed")
        assert grid_seeds(page) == SEEDS
        page.select_option("#order", "informative")
        assert grid_seeds(page) == [21, 8, 42, 3, 15, 77]
        page.locator("body").press("Enter")  # the first unscored in this order: 21 is scored, so 8
        expect_viewer_on(page, 8, 2)
        page.keyboard.press("Digit2")  # rate and go on, in the chosen order
        expect_viewer_on(page, 42, 3)
        expect_on_disk(samples / "scores.json", {"21.png": 3, "8.png": 2})
        page.keyboard.press("Escape")

        page.reload()
        expect(page.locator("#order")).to_have_value("informative")
        expect(page.locator(".tile").first).to_have_attribute("title", "seed 21")
        assert grid_seeds(page) == [21, 8, 42, 3, 15, 77]
        assert badges(page) == {"21": "+3", "8": "+2"}
        page.select_option("#order", "seed")
        assert grid_seeds(page) == SEEDS


def test_without_an_ensemble_the_order_option_says_what_to_do(page, samples):
    write_order(samples, {seed: 0.0 for seed in SEEDS})  # a single CNN: no disagreement to order by
    with serving(samples, samples / "scores.json") as url:
        page.goto(url)
        expect(page.locator("#order option[value=informative]")).to_be_disabled()
        expect(page.locator("#order-note")).to_contain_text("--train_reward_ensemble_size")
        expect(page.locator(".tile")).to_have_count(len(SEEDS))
        assert grid_seeds(page) == SEEDS
