"""The memory budget's per-image claim: a reservation made in a pool thread for a coroutine that may be
cancelled while the thread still decodes. Whichever finishes last gives the bytes back."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from service_fakes import Fakes, eventually, png, raw, running_app, state_of

import service.api.inference as inference
from service.admission import Abandoned, Claim, MemoryBudget
from service.config import Settings
from service.errors import Overloaded


class TooLarge(Exception):
    pass


def test_a_claim_outlives_its_coroutine_while_a_thread_still_holds_the_image() -> None:
    budget = MemoryBudget(100)
    claim = Claim(budget)
    with claim.in_thread():
        claim.take(60, TooLarge())
        claim.close()  # the coroutine was cancelled; the thread is still decoding
        assert budget.used == 60
    assert budget.used == 0


def test_a_claim_is_given_back_once_when_the_threads_finish_first() -> None:
    budget = MemoryBudget(100)
    claim = Claim(budget)
    with claim.in_thread():
        claim.take(60, TooLarge())
    assert budget.used == 60  # the coroutine still holds the prepared image
    with claim.in_thread():  # the encode
        pass
    assert budget.used == 60
    claim.close()
    claim.close()
    assert budget.used == 0


def test_a_thread_that_starts_after_its_coroutine_left_does_not_start() -> None:
    budget = MemoryBudget(100)
    claim = Claim(budget)
    claim.close()
    with pytest.raises(Abandoned), claim.in_thread():
        claim.take(60, TooLarge())
    assert budget.used == 0


def test_a_refused_claim_gives_back_nothing_it_did_not_take() -> None:
    budget = MemoryBudget(100)
    with budget.hold(70, TooLarge()):
        claim = Claim(budget)
        with pytest.raises(Overloaded), claim.in_thread():
            claim.take(60, TooLarge())
        claim.close()
        assert budget.used == 70
    claim = Claim(budget)
    with pytest.raises(TooLarge), claim.in_thread():
        claim.take(101, TooLarge())
    claim.close()
    assert budget.used == 0


@pytest.mark.anyio
@pytest.mark.parametrize("stage", ["decode_image", "encode_image"])
async def test_a_request_cancelled_in_the_pool_keeps_its_memory_counted_until_the_thread_ends(
    repo: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """The client goes away while its image is decoding or encoding: the image's memory stays in the budget
    until the pool thread is done with it, then all of it comes back."""
    entered, finish = threading.Event(), threading.Event()
    real = getattr(inference, stage)

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        finish.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, stage, held)
    async with running_app(Settings(models_dir=repo), fakes.factory) as (app, client):
        budget = state_of(app).budget
        request = asyncio.ensure_future(client.post("/translate/a2b", **raw(png((64, 64)))))
        await eventually(entered.is_set, what=f"{stage} to start")
        body_and_image = budget.used
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert 0 < budget.used <= body_and_image  # the body is released, the image in the pool thread is not
        finish.set()
        await eventually(lambda: budget.used == 0, what="the image's reservation to come back")
    assert len(fakes.batches) == (stage == "encode_image")  # an image abandoned while decoding never runs
