"""Stage `label`: the ranking page. Raters order k responses the chosen version wrote; each ranking becomes
preference pairs in a versioned feedback batch that passes the validation gate (rlhf/feedback/batches.py).

Why a small FastAPI app serving a plain HTML form, not Gradio, Argilla or Label Studio: the page is one form
(a prompt, k responses, a rank per response, "all bad"), which server-rendered HTML does with no JavaScript at
all. FastAPI and uvicorn are already in the environment through Prefect and MLflow (now pinned directly), so the
page adds no heavy dependency; Gradio would add a large package with its own queue/websocket protocol and front-end assets,
and its authentication is a login page rather than the shared rater token asked for here; Argilla and Label
Studio are servers with their own databases and accounts, a lot to run for one form. With plain HTML every
piece of untrusted text goes through ``html.escape`` in one place (``_page``), the browser test drives an
ordinary form, and the unit tests use FastAPI's TestClient.

Safety on a team network: binds 127.0.0.1 unless told otherwise; every request needs the rater token (the
``?token=`` link sets an HttpOnly, SameSite=Strict cookie, so a form on another site cannot post rankings);
model output is stripped of control and bidi-override characters and, with the prompts, PII-redacted when
sampled (nothing unredacted is shown or stored), and HTML-escaped when shown; a Content-Security-Policy forbids scripts altogether.
"""

from __future__ import annotations

import hmac
import html
import random
import secrets
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from models.loading import load_causal_lm, load_tokenizer
from rlhf.config import PipelineConfig, ValidationConfig
from rlhf.data.loading import load_split
from rlhf.drift.features import sample_responses
from rlhf.feedback.batches import BatchManifest, add_ranking, batch_name, read_rankings, validate_batch
from rlhf.feedback.pairs import Ranking, prompt_id, ranking_pairs
from rlhf.infra.distributed import device
from rlhf.infra.security import redact_texts
from rlhf.validation.checks import strip_control_characters

LABEL = "label"
TOKEN_COOKIE = "rlhf_label_token"
RATER_COOKIE = "rlhf_rater"
MAX_RATER_CHARS = 64
EMPTY_RETRIES = 4
"""Times an empty sampled response is drawn again before it is shown as it is (the gate then refuses its pairs)."""
CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"


@dataclass(frozen=True)
class LabelItem:
    """One prompt and the k responses every rater of this session ranks (the same ones, so raters can agree)."""

    prompt_id: str
    prompt: str
    responses: tuple[str, ...]
    versions: tuple[str, ...] | None = None
    """The version that wrote each response, when two versions are compared (never shown: raters rank blind)."""


@dataclass
class LabelSession:
    """The items of one labelling session and the batch its rankings go to."""

    items: list[LabelItem]
    model_version: str
    """``models:/<name>/<version>`` that sampled the responses."""
    folder: Path
    manifest: BatchManifest
    validation: ValidationConfig
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_item(self, rater: str) -> LabelItem | None:
        """The first item ``rater`` has not ranked yet; None when they ranked them all."""
        done = {r.prompt_id for r in read_rankings(self.folder) if r.rater == rater}
        return next((item for item in self.items if item.prompt_id not in done), None)


def sample_items(
    policy_dir: str,
    prompts: list[str],
    k: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    trust_remote_code: bool = False,
) -> list[LabelItem]:
    """k responses per prompt from the policy in ``policy_dir``, PII-redacted (prompt too)."""
    tokenizer = load_tokenizer(policy_dir, trust_remote_code)
    model = load_causal_lm(policy_dir, trust_remote_code=trust_remote_code).to(device()).eval()
    torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(k)]
    responses = sample_responses(model, tokenizer, flat, max_new_tokens, temperature)
    for _ in range(EMPTY_RETRIES):
        empty = [i for i, r in enumerate(responses) if not r.strip()]
        if not empty:
            break
        again = sample_responses(model, tokenizer, [flat[i] for i in empty], max_new_tokens, temperature)
        for i, r in zip(empty, again):
            responses[i] = r
    # Untrusted text: PII redacted, and control or bidi-override characters (which hide or reorder text on the page,
    # and which the validation gate refuses) removed, before anything is shown or stored.
    responses = [strip_control_characters(r) for r in responses]
    shown = redact_texts(list(prompts)), redact_texts(responses)
    return [LabelItem(prompt_id(p), p, tuple(shown[1][j * k : (j + 1) * k])) for j, p in enumerate(shown[0])]


def mix_items(
    first: list[LabelItem], second: list[LabelItem], versions: tuple[str, str], k: int, seed: int
) -> list[LabelItem]:
    """Per prompt, the first ``ceil(k/2)`` responses of ``first`` and ``floor(k/2)`` of ``second`` in an order
    shuffled with ``seed`` (so position says nothing about the version), each tagged with its version."""
    rng = random.Random(seed)
    mixed = []
    for a, b in zip(first, second):
        if a.prompt_id != b.prompt_id:
            raise ValueError("mix_items needs both versions' items on the same prompts, in the same order")
        drawn = [(r, versions[0]) for r in a.responses[: (k + 1) // 2]] + [
            (r, versions[1]) for r in b.responses[: k // 2]
        ]
        rng.shuffle(drawn)
        mixed.append(LabelItem(a.prompt_id, a.prompt, tuple(r for r, _ in drawn), tuple(v for _, v in drawn)))
    return mixed


def label_prompts(path: str, n: int, seed: int) -> list[str]:
    """``n`` distinct prompts drawn with ``seed`` from a prompt file (all of them when it has fewer)."""
    prompts = list(dict.fromkeys(load_split(path)["prompt"]))
    if not prompts:
        raise ValueError(f"{path} has no prompts: give a file with a `prompt` column (--prompts)")
    return random.Random(seed).sample(prompts, min(n, len(prompts)))


def open_session(
    cfg: PipelineConfig, items: list[LabelItem], model_version: str, origin: str, now: datetime | None = None
) -> LabelSession:
    """A new batch under ``feedback.dir`` for the rankings of ``items``."""
    now = now or datetime.now(UTC)
    name = batch_name(LABEL, model_version, now)
    manifest = BatchManifest(name, "ranking", model_version, now.isoformat(), origin=origin)
    return LabelSession(items, model_version, Path(cfg.feedback.dir) / name, manifest, cfg.validation)


# -- the page ------------------------------------------------------------------------------------------------
def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    """Every page: ``body`` must already be escaped (each untrusted string goes through ``html.escape``)."""
    doc = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "pre{white-space:pre-wrap;background:#f4f4f4;padding:.6rem;border-radius:4px;margin:.3rem 0}"
        ".response{border:1px solid #ccc;border-radius:6px;padding:.6rem;margin:.6rem 0}"
        ".note{color:#555}.ok{color:#060}.bad{color:#a00}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(doc, status_code=status, headers={"Content-Security-Policy": CSP, "X-Frame-Options": "DENY"})


def _ranking_form(session: LabelSession, item: LabelItem, rater: str, done: int) -> str:
    k = len(item.responses)
    e = html.escape
    parts = [
        f"<p class='note'>Prompt {done + 1} of {len(session.items)} &middot; model {e(session.model_version)} "
        f"&middot; batch {e(session.manifest.batch)}</p>",
        "<form method='post' action='/rank'>",
        f"<input type='hidden' name='prompt_id' value='{e(item.prompt_id)}'>",
        f"<p><label>Rater <input name='rater' id='rater' value='{e(rater)}' required maxlength='{MAX_RATER_CHARS}'>"
        "</label></p>",
        f"<h2>Prompt</h2><pre id='prompt'>{e(item.prompt)}</pre>",
        f"<h2>Responses</h2><p class='note'>Give each response its place, 1 = best, {k} = worst. "
        "Equal places are a tie. Tick <em>All bad</em> when none is acceptable.</p>",
    ]
    for i, response in enumerate(item.responses):
        options = "".join(
            f"<option value='{r}'{' selected' if r == i + 1 else ''}>{r}</option>" for r in range(1, k + 1)
        )
        parts.append(
            f"<div class='response' id='response-{i}'><pre>{e(response) or '<em>(empty response)</em>'}</pre>"
            f"<label>Place <select name='rank_{i}' id='rank-{i}'>{options}</select></label></div>"
        )
    parts.append(
        "<p><label><input type='checkbox' name='all_bad' id='all-bad' value='1'> All bad</label></p>"
        "<p><button type='submit' id='save'>Save ranking</button></p></form>"
    )
    return "".join(parts)


def _status_line(manifest: BatchManifest) -> str:
    verdict = (
        "<span class='ok' id='verdict'>passes the validation gate</span>"
        if manifest.validated
        else "<span class='bad' id='verdict'>fails the validation gate: "
        + html.escape("; ".join(manifest.failures))
        + "</span>"
    )
    return (
        f"<p id='status'>Batch {html.escape(manifest.batch)}: {manifest.rankings} rankings, {manifest.pairs} pairs, "
        f"{verdict}.</p><form method='post' action='/validate'><button type='submit' id='validate'>"
        "Validate and save the data set</button></form>"
    )


def create_app(session: LabelSession, token: str) -> FastAPI:
    """The ranking page over ``session``; every route needs ``token`` (cookie, ``?token=`` or a Bearer header)."""
    if len(token) < 16:
        raise ValueError("the rater token must be at least 16 characters: leave --token out to get a random one")
    app = FastAPI(title="rlhf label", docs_url=None, redoc_url=None, openapi_url=None)

    def authorised(request: Request) -> bool:
        given = request.cookies.get(TOKEN_COOKIE) or request.query_params.get("token") or ""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:]
        return hmac.compare_digest(given.encode(), token.encode())

    def refused() -> HTMLResponse:
        body = "<p>Open the link with the rater token that `rlhf label` printed (…/?token=…).</p>"
        return _page("Rater token required", body, status=401)

    @app.get("/")
    def index(request: Request) -> Response:
        if not authorised(request):
            return refused()
        if "token" in request.query_params:  # keep the token out of the address bar and the history
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        rater = request.cookies.get(RATER_COOKIE, "")
        saved = request.query_params.get("saved")
        note = f"<p class='ok' id='saved'>Saved: {int(saved)} pairs.</p>" if saved and saved.isdigit() else ""
        item = session.next_item(rater) if rater else session.items[0]
        if item is None:
            body = note + f"<p id='done'>All {len(session.items)} prompts ranked. Thank you.</p>"
            return _page("Ranking done", body + _status_line(session.manifest))
        done = sum(1 for r in read_rankings(session.folder) if r.rater == rater) if rater else 0
        return _page(
            "Rank the responses", note + _ranking_form(session, item, rater, done) + _status_line(session.manifest)
        )

    @app.post("/rank")
    async def rank(request: Request) -> Response:
        if not authorised(request):
            return refused()
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
        items = {item.prompt_id: item for item in session.items}
        item = items.get(form.get("prompt_id", ""))
        rater = " ".join(form.get("rater", "").split())[:MAX_RATER_CHARS]
        problem = None
        if item is None:
            problem = "unknown prompt: reload the page"
        elif not rater:
            problem = "give your name as rater"
        else:
            k = len(item.responses)
            try:
                ranks = tuple(int(form[f"rank_{i}"]) for i in range(k))
            except (KeyError, ValueError):
                problem = f"give every response a place 1..{k}"
        if problem is not None or item is None:
            return _page(
                "Not saved", f"<p class='bad'>{html.escape(problem or '')}</p><p><a href='/'>Back</a></p>", 400
            )
        ranking = Ranking(
            prompt_id=item.prompt_id,
            prompt=item.prompt,
            responses=item.responses,
            ranks=ranks,
            rater=rater,
            time=datetime.now(UTC).isoformat(),
            model_version=session.model_version,
            batch=session.manifest.batch,
            all_bad=form.get("all_bad") == "1",
            response_versions=item.versions,
        )
        with session.lock:
            session.manifest = add_ranking(session.folder, session.manifest, ranking)
        response = RedirectResponse(f"/?saved={len(ranking_pairs(ranking))}", status_code=303)
        response.set_cookie(RATER_COOKIE, rater, httponly=True, samesite="strict")
        return response

    @app.post("/validate")
    def validate(request: Request) -> Response:
        if not authorised(request):
            return refused()
        with session.lock:
            session.manifest = validate_batch(session.folder, session.manifest, session.validation)
        return RedirectResponse("/?validated=1", status_code=303)

    @app.get("/batch")
    def batch(request: Request) -> Response:
        if not authorised(request):
            return refused()
        return JSONResponse({**asdict(session.manifest), "folder": str(session.folder)})

    return app


def new_token() -> str:
    return secrets.token_urlsafe(24)


# -- the command ---------------------------------------------------------------------------------------------
def resolve_policy(model_name: str, alias: str | None, version: str | None, into: str) -> tuple[str, str, bool]:
    """(``models:/<name>/<version>``, local policy folder, trust_remote_code) of the version to sample."""
    from mlflow.tracking import MlflowClient

    from rlhf.drift.lineage import resolve_lineage
    from rlhf.infra.tracking import download

    lineage = resolve_lineage(MlflowClient(), model_name, version, alias)
    return (
        f"models:/{lineage.model_name}/{lineage.version}",
        str(download(lineage.policy_uri, into)),
        lineage.trust_remote_code,
    )


def prepare_session(
    cfg: PipelineConfig,
    model_name: str | None = None,
    alias: str | None = "champion",
    version: str | None = None,
    prompts_path: str | None = None,
    versus: str | None = None,
) -> LabelSession:
    """Sample the version's responses to ``feedback.prompts`` prompts (the training prompts unless
    ``prompts_path``) and open a new batch for their rankings; with ``versus`` (an alias, e.g. challenger), half
    of each prompt's k responses come from that version."""
    import tempfile

    from rlhf.builtin.task import resolve_data_paths

    fb = cfg.feedback
    if prompts_path is None:
        prompts_path = resolve_data_paths(cfg.data, Path(cfg.output_dir) / LABEL, cfg.seed)["prompts"]
    prompts = label_prompts(prompts_path, fb.prompts, cfg.seed)
    name = model_name or cfg.registered_model
    with tempfile.TemporaryDirectory(prefix="rlhf-label-") as scratch:
        model_version, policy_dir, trust = resolve_policy(name, alias, version, scratch + "/a")
        items = sample_items(policy_dir, prompts, fb.k, fb.max_new_tokens, fb.temperature, cfg.seed, trust)
        if versus is not None:  # champion vs challenger: half the responses from each, shuffled, ranked blind
            other, other_dir, other_trust = resolve_policy(name, versus, None, scratch + "/b")
            theirs = sample_items(
                other_dir, prompts, fb.k, fb.max_new_tokens, fb.temperature, cfg.seed + 1, other_trust
            )
            items = mix_items(items, theirs, (model_version, other), fb.k, cfg.seed)
            model_version = f"{model_version} vs {other}"
    return open_session(cfg, items, model_version, origin=prompts_path)


def serve(session: LabelSession, host: str, port: int, token: str) -> None:
    """Serve the page until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.run(create_app(session, token), host=host, port=port, log_level="warning")
