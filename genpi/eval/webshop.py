"""A client for a WebShop server: each system shops for the server's goals, scored by the server's reward.

    genpi eval webshop --url URL --catalog C --prompt ID [--adapters DIR ...] [--goals N] [--out EVAL]

WebShop (princeton-nlp/WebShop) needs Java and about 15 GB of data, so genpi never runs it: start its
web app yourself (`python -m web_agent_site.app`, port 3000) and pass its address. Goal i is the app's
session `..._fixed_i` (its fixed goal i); every system and goal gets its own session.

The client reads pages as WebShop's text environment does (genpi.eval.webshop.Page): the observation is
the page's visible texts joined by " [SEP] "; the clickables are the buttons (lowercased), the product
links (lowercased codes) and the option values; search works from every page (the search form posts to
the session's start page). The agent's reply is parsed as AgentBench does (the first
`Action: search[...]` or `Action: click[...]`); a reply without one ends the episode with reward 0, a
click on something not on the page changes nothing, clicking "Buy Now" ends the episode with the reward
the server's done page shows (`#reward`), and 10 rounds end it with reward 0. Greedy; P before the
conversation for the teacher only.

Layouts of the user turns: `agentbench` ("Observation:\\n...\\n\\nAvailable Actions:\\n{'has_search_bar': ...,
'clickables': [...]}", AgentBench's) or `examples` (clickables in brackets and the instruction on the
first page only, as examples/agents.yaml's web-shop prompt shows them).

Per-episode rows: `EVAL/webshop/ID/NAME/part-00000.parquet`; summary (mean reward,
success = reward 1, per system; retention = system / teacher): `EVAL/webshop.json`, one summary per prompt
(`{"results": [...]}`; a rerun replaces its prompt's).
"""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa

from genpi import InputError
from genpi.data.store import TURN
from genpi.engines import ChatRequest, Sampling
from genpi.eval import evaluate as skeleton
from genpi.eval.evaluate import pct, task_text
from genpi.eval.settings import SystemsSettings, WebShopSettings
from genpi.eval.systems import task_prompt

ROUNDS = 10  # AgentBench's limit
ACTION = re.compile(r"[Aa]ction: *\n* *((search|click)\[.+?])")  # AgentBench's pattern
BUY = "buy now"
LAYOUTS = ("agentbench", "examples")
METRICS = ("mean_reward", "success_rate")
HIDDEN = {"style", "script", "head", "title", "meta"}  # text under these is not shown (WebShop's tag_visible)

EPISODE_SCHEMA = skeleton.row_schema(
    ("goal", pa.int32()),
    ("session", pa.string()),
    ("instruction", pa.string()),
    ("reward", pa.float64()),  # the server's, at purchase; 0 otherwise
    ("ended", pa.string()),  # purchased | invalid_action | round_limit | error
    ("rounds", pa.int32()),  # agent replies
    ("actions", pa.list_(pa.string())),  # the parsed action of each reply (null: none)
    ("turns", pa.list_(TURN)),  # observations ("user") and replies ("assistant"), without P
    ("error", pa.string()),
)


@dataclass
class Page:
    """A WebShop page as its text environment sees it."""

    url: str
    texts: list[str] = field(default_factory=list)  # visible texts, stripped, in order
    clickable: list[bool] = field(default_factory=list)  # per text: a button, product link or option label
    buttons: dict[str, str] = field(default_factory=dict)  # lowercased text -> its form's action (POST)
    links: dict[str, str] = field(default_factory=dict)  # lowercased product code -> href (GET)
    options: dict[str, str] = field(default_factory=dict)  # option value -> data-url (GET)
    search_url: str | None = None  # the search form's action, if the page has one
    reward: float | None = None  # on the done page

    @property
    def targets(self) -> dict[str, tuple[str, str]]:
        """Every clickable -> (method, URL), in WebShop's order (buttons, product links, options)."""
        return {
            **{k: ("POST", v) for k, v in self.buttons.items()},
            **{k: ("GET", v) for k, v in {**self.links, **self.options}.items()},
        }


class _Reader(HTMLParser):
    def __init__(self, page: Page):
        super().__init__(convert_charrefs=True)
        self.page, self.stack, self.form, self.button, self.link = page, [], None, None, None
        self.in_reward = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag not in ("input", "meta", "link", "img", "br", "hr"):
            self.stack.append(tag)
        url = lambda value: urllib.parse.urljoin(self.page.url, value or "")  # noqa: E731
        if tag == "form":
            self.form = url(a.get("action"))
        elif tag == "button" and "btn" in classes:
            self.button = []
        elif tag == "a" and "product-link" in classes:
            self.link = ([], url(a.get("href")))
        elif tag == "input" and a.get("id") == "search_input":
            self.page.search_url = self.form
        elif tag == "input" and a.get("type") == "radio" and a.get("value") is not None:
            self.page.options[a["value"]] = url(a.get("data-url"))
        elif a.get("id") == "reward":
            self.in_reward = True

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag:  # tolerate unclosed tags
            pass
        if tag == "button" and self.button is not None:
            self.page.buttons["".join(self.button).strip().lower()] = self.form or self.page.url
            self.button = None
        elif tag == "a" and self.link is not None:
            self.page.links["".join(self.link[0]).strip().lower()] = self.link[1]
            self.link = None
        elif tag == "form":
            self.form = None

    def handle_data(self, data):
        if self.button is not None:
            self.button.append(data)
        if self.link is not None:
            self.link[0].append(data)
        if self.in_reward and self.stack and self.stack[-1] == "pre" and data.strip():
            self.page.reward = float(data.strip())
            self.in_reward = False
        if data.strip() and not (self.stack and self.stack[-1] in HIDDEN):
            self.page.texts.append(data.strip())
            self.page.clickable.append(
                self.button is not None or self.link is not None or (self.stack[-1:] == ["label"])
            )


def read_page(url: str, html: str) -> Page:
    page = Page(url)
    _Reader(page).feed(html)
    return page


def fetch(method: str, url: str, form: dict | None = None, timeout: float = 60) -> Page:
    """GET or POST (a form) and read the page the server answers with, after its redirects."""
    data = urllib.parse.urlencode(form or {}).encode() if method == "POST" else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=timeout) as response:
        return read_page(response.geturl(), response.read().decode("utf-8", errors="replace"))


def parse_action(reply: str) -> str | None:
    match = ACTION.search(reply)
    return match.group(1) if match else None


def observation(page: Page, layout: str, first: bool) -> str:
    """The user turn showing `page`."""
    if layout == "examples":  # clickables in brackets; the instruction on the first page only
        texts = [f"[{t}]" if c and t.lower() != "search" else t for t, c in zip(page.texts, page.clickable)]
        if not first and "Instruction:" in texts:
            i = texts.index("Instruction:")
            del texts[i : i + 2]
        return " [SEP] ".join(texts)
    actions = {"has_search_bar": page.search_url is not None, "clickables": list(page.targets)}
    return f"Observation:\n{' [SEP] '.join(page.texts)}\n\nAvailable Actions:\n{actions}"


def step(page: Page, action: str, search_url: str) -> Page:
    """The page an action leads to (the same page for a click on nothing it has)."""
    name, _, arg = action.partition("[")
    arg = arg[:-1].strip()
    if name == "search" and arg:
        return fetch("POST", search_url, {"search_query": arg})
    targets = {k.lower(): v for k, v in page.targets.items() if k != "search"}  # WebShop never clicks "search"
    if name == "click" and arg.lower() in targets:
        return fetch(*targets[arg.lower()])
    return page


async def shop(url: str, goal: int, agent, prefix: list[dict], sampling: Sampling, layout: str = "agentbench") -> dict:
    """One episode on goal `goal`; `agent` is an AsyncEngine (`complete(request)`)."""
    session = f"genpi{uuid.uuid4().hex[:12]}_fixed_{goal}"  # the app takes the goal from the last "_" part
    turns, actions, reward, ended, error, instruction = [], [], 0.0, "round_limit", None, None
    try:
        page = await asyncio.to_thread(fetch, "GET", f"{url.rstrip('/')}/{session}")
        search_url = page.search_url or page.url
        if "Instruction:" in page.texts[:-1]:
            instruction = page.texts[page.texts.index("Instruction:") + 1]
        for round_ in range(ROUNDS):
            turns.append({"role": "user", "content": observation(page, layout, round_ == 0)})
            reply = await agent.complete(ChatRequest(prefix + turns, sampling, prefix_messages=len(prefix)))
            if reply.error:
                ended, error = "error", reply.error
                break
            turns.append({"role": "assistant", "content": reply.text})
            action = parse_action(reply.text)
            actions.append(action)
            if action is None:
                ended = "invalid_action"
                break
            page = await asyncio.to_thread(step, page, action, search_url)
            if page.reward is not None:
                reward, ended = page.reward, "purchased"
                break
    except (OSError, ValueError, urllib.error.URLError) as e:  # recorded on the episode, never dropped
        ended, error = "error", f"{type(e).__name__}: {e}"
    return {
        "goal": goal,
        "session": session,
        "instruction": instruction,
        "reward": reward,
        "ended": ended,
        "rounds": len(actions),
        "actions": actions,
        "turns": turns,
        "error": error,
    }


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    share = lambda f: sum(map(f, rows)) / n if n else None  # noqa: E731
    return {
        "goals": n,
        "errors": sum(r["error"] is not None for r in rows),
        "mean_reward": share(lambda r: r["reward"]),
        "success_rate": share(lambda r: r["reward"] >= 1.0),
        "purchase_rate": share(lambda r: r["ended"] == "purchased"),
        "invalid_action_rate": share(lambda r: r["ended"] == "invalid_action"),
        "mean_rounds": share(lambda r: r["rounds"]),
    }


def score(rows: dict[str, list[dict]]) -> tuple[dict, dict]:
    """(metrics per system, retention per system: system / teacher per metric)."""
    metrics = {name: summarize(rs) for name, rs in rows.items()}
    return metrics, skeleton.retained(metrics, skeleton.per_metric(METRICS))


def check_server(url: str | None) -> str:
    if not url:
        raise InputError(
            "genpi eval webshop needs --url URL: the address of a WebShop web app you run "
            "(princeton-nlp/WebShop: `python -m web_agent_site.app`, port 3000; it needs Java and about 15 GB of data)"
        )
    if not re.match(r"https?://", url):
        raise InputError(f"--url {url}: expected an http:// or https:// address")
    try:
        page = fetch("GET", f"{url.rstrip('/')}/genpi-check_fixed_0", timeout=30)
    except (OSError, ValueError) as e:
        raise InputError(f"--url {url}: no WebShop server answers there ({type(e).__name__}: {e})") from None
    if page.search_url is None:
        raise InputError(f"--url {url}: the start page has no search box (id search_input): not a WebShop server?")
    return url


def evaluate(
    url: str | None, systems: SystemsSettings, settings: WebShopSettings, command: list[str] | None = None
) -> dict:
    url = check_server(url)
    task, base_path = task_prompt(systems, settings.prompt)

    sampling = Sampling(max_tokens=settings.max_new_tokens)
    play = skeleton.ask_every(
        "webshop",
        list(range(settings.goals)),
        "goals",
        lambda goal, agent, prefix: shop(url, goal, agent, prefix, sampling, settings.layout),
    )
    counts = {"goals": settings.goals, "rounds": ROUNDS}
    describe = skeleton.describe_web(command, {"url": url}, systems.catalog, base_path, settings, counts)
    webshop = skeleton.Evaluation("webshop", EPISODE_SCHEMA, play, summarize, describe, skeleton.per_metric(METRICS))
    run = skeleton.RunSettings(base_path, Path(settings.out), systems.max_batch)
    return skeleton.evaluate_task(webshop, task, run)


def format_summary(summary: dict) -> str:
    title = (
        f"\n{summary['prompt_id']}: {summary['goals']} WebShop goals at {summary['url']} ({summary['layout']} layout)"
    )
    header = f"{'system':<14}{'reward':>10}{'success':>10}{'bought':>10}{'invalid':>10}{'rounds':>8}{'errors':>8}"
    rows = [
        f"{name:<14}{m['mean_reward']:>10.3f}{pct(m['success_rate']):>10}{pct(m['purchase_rate']):>10}"
        f"{pct(m['invalid_action_rate']):>10}{m['mean_rounds']:>8.1f}{m['errors']:>8}"
        for name, m in summary["systems"].items()
    ]
    return task_text(summary, title, header, rows, 10)
