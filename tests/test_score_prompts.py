"""A round made from a prompt file on the rating page: each image's prompt comes from round.json (else its
PNG), the page shows it (grid caption, full view, above a comparison) and filters the grid by it, and
comparisons pair only images of the same prompt, over HTTP and in a real browser (Debian's Chromium)."""

import json
import os

import pytest
import test_score_browser
from playwright.sync_api import expect
from score_round import read_json, serving, write_json, write_round
from test_score_browser import CHROMIUM, expect_new_pair, screenshot, shown_pair
from test_score_http import request

browser, page = test_score_browser.browser, test_score_browser.page  # its Chromium fixtures, shared

SEEDS = [3, 8, 15, 21, 42, 77, 90, 101, 128]
PROMPTS = ["a neon sign of a cat, night street, rain", "a lighthouse at dusk, oil painting",
           "a bowl of ramen on a wooden table, studio photo, soft window light, shallow depth of field, 35 mm"]
PROMPT_OF = {f"{seed}.png": PROMPTS[index % len(PROMPTS)] for index, seed in enumerate(SEEDS)}


def write_prompt_round(folder, seeds=SEEDS, prompts=PROMPT_OF):
    """The round's PNGs and round.json with each seed's prompt, as generate.py writes them for a prompt_file."""
    names = write_round(folder, seeds)
    by_seed = {name.removesuffix(".png"): prompt for name, prompt in prompts.items()}
    write_json(folder / "round.json", {"parameters": {"prompt": "the round's one prompt"}, "seeds": seeds,
                                       "prompts": by_seed})
    return names


@pytest.fixture
def samples(tmp_path):
    folder = tmp_path / "samples"
    write_prompt_round(folder)
    return folder


def test_the_state_gives_each_image_its_prompt_from_round_json_else_its_png(tmp_path):
    folder = tmp_path / "samples"
    write_prompt_round(folder, SEEDS[:4], {"3.png": PROMPTS[0], "8.png": PROMPTS[1]})
    write_round(folder, [500])  # in the folder, not in round.json: its PNG says
    with serving(folder, folder / "scores.json") as url:
        images = json.loads(request(url, "GET", "/api/state")[2])["images"]
    assert {image["file"]: image["prompt"] for image in images} == {
        "3.png": PROMPTS[0], "8.png": PROMPTS[1], "15.png": "the round's one prompt",
        "21.png": "the round's one prompt", "500.png": "a neon sign <lora:ui_lora_epoch_10:1>"}


def test_every_pair_offered_over_http_is_of_one_prompt_until_none_is_left(samples):
    asked = []
    with serving(samples, samples / "scores.json") as url:
        pair = json.loads(request(url, "GET", "/api/next_pair")[2])
        while pair["a"] is not None:
            assert PROMPT_OF[pair["a"]] == PROMPT_OF[pair["b"]], pair
            asked.append(frozenset((pair["a"], pair["b"])))
            status, _, answer = request(url, "POST", "/api/compare", {"a": pair["a"], "b": pair["b"], "winner": "a"})
            assert status == 200
            pair = json.loads(answer)["next"]
    # three prompts of three images: three pairs each, every one asked once
    assert len(asked) == len(set(asked)) == 9
    assert {frozenset((c["a"], c["b"])) for c in read_json(samples / "comparisons.json")} == set(asked)


def test_a_comparison_across_prompts_is_refused_and_nothing_is_written(samples):
    a, b = "3.png", "8.png"
    assert PROMPT_OF[a] != PROMPT_OF[b]
    with serving(samples, samples / "scores.json") as url:
        status, _, answer = request(url, "POST", "/api/compare", {"a": a, "b": b, "winner": "a"})
        assert status == 400 and "different prompts" in json.loads(answer)["error"]
        same = [name for name in PROMPT_OF if PROMPT_OF[name] == PROMPT_OF[a] and name != a][0]
        assert request(url, "POST", "/api/compare", {"a": a, "b": same, "winner": "tie"})[0] == 200
    assert read_json(samples / "comparisons.json") == [{"a": a, "b": same, "winner": "tie"}]


def caption_of(page, seed):
    return page.locator(f'.tile[title="seed {seed}"] .caption')


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's Chromium at {CHROMIUM}")
def test_the_page_shows_prompts_filters_by_them_and_compares_within_one(page, samples):
    with serving(samples, samples / "scores.json") as url:
        page.set_viewport_size({"width": 1100, "height": 760})
        page.goto(url)
        expect(page.locator("#counter")).to_have_text("9 loaded / 0 scored")
        for name, prompt in PROMPT_OF.items():  # the grid: a caption, the whole prompt on hover
            expect(caption_of(page, name.removesuffix(".png"))).to_have_text(prompt)
            expect(caption_of(page, name.removesuffix(".png"))).to_have_attribute("title", prompt)
        screenshot(page, "score_prompts_grid.png")

        options = page.locator("#prompt-filter option")
        assert options.all_text_contents() == ["every prompt (3)", f"{PROMPTS[0]} (3)", f"{PROMPTS[1]} (3)",
                                               f"{PROMPTS[2][:59]}… (3)"]
        page.select_option("#prompt-filter", PROMPTS[1])
        visible = [tile.get_attribute("title") for tile in page.locator(".tile:visible").all()]
        assert visible == [f"seed {n.removesuffix('.png')}" for n, p in PROMPT_OF.items() if p == PROMPTS[1]]
        page.keyboard.press("Enter")  # the first unscored image the filter shows; its prompt always shown
        expect(page.locator("#viewer-prompt")).to_have_text(PROMPTS[1])
        expect(page.locator("#viewer-position")).to_contain_text("2 of 9")
        page.keyboard.press("ArrowRight")  # the next image of this prompt, not the next of the round
        expect(page.locator("#viewer-seed")).to_have_text("42")
        expect(page.locator("#viewer-prompt")).to_have_text(PROMPTS[1])
        page.keyboard.press("Escape")
        page.select_option("#prompt-filter", "")
        expect(page.locator(".tile:visible")).to_have_count(9)

        page.keyboard.press("c")
        pairs = [shown_pair(page)]
        page.wait_for_function("document.getElementById('compare-image-b').naturalWidth > 0")
        screenshot(page, "score_prompts_compare.png")
        while True:  # every pair offered, until none is left, is of one prompt, and says which
            a, b = pairs[-1]
            assert PROMPT_OF[a] == PROMPT_OF[b], (a, b)
            expect(page.locator("#compare-prompt")).to_have_text(PROMPT_OF[a])
            page.keyboard.press("ArrowLeft")
            saved = f"{len(pairs)} comparison{'s' * (len(pairs) > 1)} saved"
            expect(page.locator("#compare-count")).to_have_text(saved)
            if len(pairs) == 9:
                break
            pairs.append(expect_new_pair(page, pairs[-1]))
        expect(page.locator("#compare-done")).to_be_visible()
        expect(page.locator("#compare-prompt")).to_have_text("")
    saved = read_json(samples / "comparisons.json")
    assert [(c["a"], c["b"]) for c in saved] == pairs and len({frozenset(p) for p in pairs}) == 9


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's Chromium at {CHROMIUM}")
def test_a_round_of_one_prompt_looks_as_before(page, tmp_path):
    folder = tmp_path / "samples"
    write_round(folder, SEEDS[:4])
    with serving(folder, folder / "scores.json") as url:
        page.goto(url)
        expect(page.locator("#counter")).to_have_text("4 loaded / 0 scored")
        expect(page.locator(".caption")).to_have_count(0)
        expect(page.locator("#prompt-choice")).to_be_hidden()
        page.keyboard.press("Enter")
        expect(page.locator("#viewer-prompt")).to_have_text("a neon sign <lora:ui_lora_epoch_10:1>")
