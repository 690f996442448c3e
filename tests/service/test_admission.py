"""The memory budget's per-image claim: a reservation made in a pool thread for a coroutine that may be
cancelled while the thread still decodes. Whichever finishes last gives the bytes back."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from service_fakes import Fakes, eventually, png, raw, running_app, state_of

import service.api.inference as inference
from service.admission import Abandoned, Claim, MemoryBudget
from service.config import Settings
from service.errors import Overloaded


class TooLarge(Exception):
    pass


def test_a_claim_outlives_its_coroutine_while_the_thread_still_holds_the_image() -> None:
    budget = MemoryBudget(100)
    claim = Claim(budget)
    claim.take(60, TooLarge())
    claim.close()  # the coroutine was cancelled; the thread is still decoding
    assert budget.used == 60
    claim.thread_done()
    assert budget.used == 0


def test_a_claim_is_given_back_once_when_the_thread_finishes_first() -> None:
    budget = MemoryBudget(100)
    claim = Claim(budget)
    claim.take(60, TooLarge())
    claim.thread_done()
    assert budget.used == 60  # the coroutine still holds the prepared image
    claim.close()
    claim.close()
    assert budget.used == 0


def test_a_thread_that_starts_after_its_coroutine_left_reserves_nothing() -> None:
    budget = MemoryBudget(100)
    claim = Claim(budget)
    claim.close()
    with pytest.raises(Abandoned):
        claim.take(60, TooLarge())
    claim.thread_done()
    assert budget.used == 0


def test_a_refused_claim_gives_back_nothing_it_did_not_take() -> None:
    budget = MemoryBudget(100)
    with budget.hold(70, TooLarge()):
        claim = Claim(budget)
        with pytest.raises(Overloaded):
            claim.take(60, TooLarge())
        claim.thread_done()
        claim.close()
        assert budget.used == 70
    with pytest.raises(TooLarge):
        Claim(budget).take(101, TooLarge())
    assert budget.used == 0


@pytest.mark.anyio
async def test_a_request_cancelled_during_its_decode_keeps_the_memory_counted_until_the_decode_ends(
    repo: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client goes away while its image is decoding: the decode's memory stays in the budget until the
    pool thread is done with it, then all of it comes back."""
    decoding, finish = threading.Event(), threading.Event()
    real_decode = inference.decode_image

    def held_decode(data: bytes, *, max_pixels: int):  # noqa: ANN202 - the patched function's own type
        decoding.set()
        finish.wait(10)
        return real_decode(data, max_pixels=max_pixels)

    monkeypatch.setattr(inference, "decode_image", held_decode)
    async with running_app(Settings(models_dir=repo), fakes.factory) as (app, client):
        budget = state_of(app).budget
        request = asyncio.ensure_future(client.post("/translate/a2b", **raw(png((64, 64)))))
        await eventually(decoding.is_set, what="the decode to start")
        body_and_image = budget.used
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert 0 < budget.used <= body_and_image  # the body is released, the image being decoded is not
        finish.set()
        await eventually(lambda: budget.used == 0, what="the decode's reservation to come back")
    assert fakes.batches == []  # the abandoned image was never run
