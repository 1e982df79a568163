"""`genpi eval webshop`: the client against a small local HTTP server written for this test.

The server is not WebShop: it serves two goals and three products in the layout of WebShop's web app
(princeton-nlp/WebShop web_agent_site: the same routes, the instruction in `#instruction-text h4`, buttons
`.btn` inside POST forms, product codes as `a.product-link`, options as radio inputs with `data-url`, the
reward in `#reward pre` on the done page) and a reward of its own (1 for the right product and options,
0.5 for the right product alone, else 0). It checks the client's protocol, not WebShop.
"""

import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote

import duckdb
import pytest
from conftest import EXAMPLES, REPO

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.engines import Completion, Sampling
from genpi.eval.evaluate import play_every
from genpi.eval.systems import System
from genpi.eval.webshop import ROUNDS, check_server, parse_action, score, shop

WEB_SHOP = next(e for e in load_catalog(EXAMPLES) if e.id == "web-shop")
PRODUCTS = {
    "B0TEA00001": ("Green Tea Bags, 100 Count", "$12.99", {"flavor": ["jasmine", "mint"]}),
    "B0MUG00002": ("Ceramic Coffee Mug Set of 4", "$24.50", {"color": ["matte black", "white"]}),
    "B0LAMP0003": ("LED Desk Lamp with Wireless Charger", "$39.00", {}),
}
GOALS = [  # instruction, the right product, its options
    ("i want green tea bags with mint flavor, and price lower than 20.00 dollars", "B0TEA00001", {"flavor": "mint"}),
    (
        "i need a set of 4 ceramic coffee mugs in matte black, and price lower than 40.00 dollars",
        "B0MUG00002",
        {"color": "matte black"},
    ),
]


def page(instruction: str, body: str, top: str = "") -> str:
    return (
        "<!DOCTYPE html><html><head><title>WebShop</title><style>.x {}</style>"
        '<script>var a = "hidden";</script></head>'
        f'<body><div class="container">{top}<div id="instruction-text" class="text-center">'
        f"<h4>Instruction: <br>{instruction}</h4></div>"
        f"{body}</div></body></html>"
    )


def form(action: str, label: str, css: str = "btn btn-primary") -> str:
    return f'<form method="post" action="{action}"><button type="submit" class="{css}">{label}</button></form>'


class WebShopLike(BaseHTTPRequestHandler):
    sessions: dict = {}
    log: list = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self.route(None)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.route(parse_qs(self.rfile.read(length).decode()))

    def send(self, html: str, status: int = 200, location: str | None = None):
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(html.encode())

    def route(self, data):
        parts = [unquote(p) for p in self.path.split("/")[1:]]
        self.log.append((self.command, parts))
        session = parts[0] if len(parts) == 1 else parts[1]
        if "fixed" not in session or not session.split("_")[-1].isdigit() or int(session.split("_")[-1]) >= len(GOALS):
            return self.send("unknown goal", 500)
        instruction, want, want_options = GOALS[int(session.split("_")[-1])]
        home = f"/{quote(session)}"
        if len(parts) == 1 and data and "search_query" in data:  # WebShop's index: POST search_query, redirect
            keywords = str(data["search_query"][0].lower().split(" "))
            return self.send("", 302, f"/search_results/{quote(session)}/{quote(keywords)}/1")
        if len(parts) == 1:
            search = (
                f'<form role="form" method="post" action="{home}">'
                '<input id="search_input" class="form-control" type="text" name="search_query" '
                'placeholder="Search..." required/>'
                f'<button class="btn btn-success" type="submit"><i class="glyphicon"></i>Search</button></form>'
            )
            return self.send(page(instruction, search, top='<div id="logo"><h2>WebShop</h2></div>'))
        kind = parts[0]
        if kind == "search_results":
            keywords, number = parts[2], int(parts[3])
            words = set(eval(keywords))  # the server's own list repr
            found = [a for a, (title, _, _) in PRODUCTS.items() if words & set(title.lower().replace(",", "").split())]
            items = "".join(
                '<div class="list-group-item"><h4 class="product-asin"><a class="product-link" '
                f'href="/item_page/{quote(session)}/{a}/{quote(keywords)}/{number}/{quote("{}")}">{a}</a></h4>'
                f'<h4 class="product-title">{PRODUCTS[a][0]}</h4><h5 class="product-price">{PRODUCTS[a][1]}</h5></div>'
                for a in found
            )
            nav = (
                form(home, "Back to Search", "btn btn-success")
                + f"<h3>Page {number} (Total results: {len(found)})</h3>"
            )
            nav += form(f"/search_results/{quote(session)}/{quote(keywords)}/{number + 1}", "Next &gt;")
            return self.send(page(instruction, nav + items))
        if kind in ("item_page", "item_sub_page"):
            asin, keywords, number = parts[2], parts[3], parts[4]
            options = json.loads(parts[-1].replace("'", '"'))
            title, price, groups = PRODUCTS[asin]
            radios = ""
            for group, values in groups.items():
                radios += f"<h4>{group}</h4>"
                for i, v in enumerate(values):
                    url = (
                        f"/item_page/{quote(session)}/{asin}/{quote(keywords)}/{number}/"
                        f"{quote(json.dumps(options | {group: v}))}"
                    )
                    radios += (
                        f'<input type="radio" id="radio_{group}{i}" name="{group}" value="{v}" data-url="{url}">'
                        f'<label for="radio_{group}{i}">{v}</label>'
                    )
            here = f"{quote(session)}/{asin}/{quote(keywords)}/{number}"
            body = form(home, "Back to Search", "btn btn-success") + form(
                f"/search_results/{quote(session)}/{quote(keywords)}/{number}", "&lt; Prev"
            )
            body += radios + f"<h2>{title}</h2><h4>Price: {price}</h4><h4>Rating: N.A.</h4>"
            body += form(f"/item_sub_page/{here}/Description/{quote(json.dumps(options))}", "Description")
            body += form(
                f"/done/{quote(session)}/{asin}/{quote(json.dumps(options))}", "Buy Now", "btn btn-lg purchase"
            )
            return self.send(page(instruction, body))
        if kind == "done":
            asin, options = parts[2], json.loads(parts[3])
            reward = 1.0 if asin == want and options == want_options else 0.5 if asin == want else 0.0
            return self.send(
                "<html><body><h1>Thank you for shopping with us!</h1>"
                f'<div style="display:none"><h4 id="asin">asin<pre>{asin}</pre></h4></div>'
                f'<h3 id="reward">Your score (min 0.0, max 1.0)<pre>{reward}</pre></h3></body></html>'
            )
        return self.send("not found", 404)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), WebShopLike)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class Scripted:
    """An AsyncEngine whose reply is a function of the conversation so far (without P)."""

    model_name = "scripted"

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    async def complete(self, request):
        self.requests.append(request)
        return Completion(text=self.reply(request.messages), finish_reason="stop")


def shopper(wrong=False):
    """Shops as a person would for the goal in the first observation; `wrong`: buys another product."""

    def reply(messages):
        if messages[0]["role"] == "system":  # the teacher's: P first
            messages = messages[len(WEB_SHOP.messages()) :]
        turns = [m for m in messages if m["role"] == "user"]
        instruction = re.search(r"Instruction: \[SEP\] (.*?) \[SEP\]", turns[0]["content"]).group(1)
        _, want, options = GOALS[[g[0] for g in GOALS].index(instruction)]
        if wrong:
            want, options = next(a for a in PRODUCTS if a != want), {}
        seen = turns[-1]["content"]
        if len(turns) == 1:
            action = "search[" + PRODUCTS[want][0].split(",")[0].lower() + "]"
        elif "Total results" in seen:
            action = f"click[{want.lower()}]"  # WebShop's clickables are lowercased
        elif len(turns) - 3 < len(options):
            action = f"click[{list(options.values())[len(turns) - 3]}]"
        else:
            action = "click[Buy Now]"
        return f"Thought:\nI think so.\n\nAction:\n{action}"

    return reply


def run(url, agent, goals=(0, 1), layout="agentbench", with_prompt=False):
    system = System("teacher" if with_prompt else "base", None, with_prompt)
    sampling = Sampling(max_tokens=32)
    rows = play_every(
        list(goals),
        {system.name: (system, agent)},
        WEB_SHOP,
        lambda goal, agent, prefix: shop(url, goal, agent, prefix, sampling, layout),
    )
    return rows[system.name]


def test_parse_action_follows_agentbench():
    assert parse_action("Thought:\nI think I should search.\n\nAction:\nsearch[green tea]") == "search[green tea]"
    assert parse_action("Thought: pick it.\nAction: click[B0TEA00001] and more]") == "click[B0TEA00001]"
    assert parse_action("action: click[Buy Now]") == "click[Buy Now]"
    assert parse_action("Action: buy[B0TEA00001]") is None and parse_action("click[Buy Now]") is None


@pytest.mark.parametrize("layout", ["agentbench", "examples"])
def test_scripted_shoppers_score_exactly(server, layout):
    right, wrong = Scripted(shopper()), Scripted(shopper(wrong=True))
    metrics, kept = score(
        {"teacher": run(server, right, layout=layout, with_prompt=True), "base": run(server, wrong, layout=layout)}
    )
    assert metrics["teacher"] == {
        "goals": 2,
        "errors": 0,
        "mean_reward": 1.0,
        "success_rate": 1.0,
        "purchase_rate": 1.0,
        "invalid_action_rate": 0.0,
        "mean_rounds": 4.0,
    }
    assert metrics["base"]["mean_reward"] == 0.0 and metrics["base"]["purchase_rate"] == 1.0
    assert kept == {"base": {"mean_reward": 0.0, "success_rate": 0.0}}
    shown = [r.messages[-1]["content"] for r in right.requests]  # the goals' episodes interleave
    first = next(r.messages for r in right.requests if GOALS[0][0] in r.messages[-1]["content"])
    assert first[:-1] == WEB_SHOP.messages() and all(len(r.messages) % 2 == 1 for r in wrong.requests)
    if layout == "agentbench":
        assert first[-1]["content"] == (
            "Observation:\nWebShop [SEP] Instruction: [SEP] " + GOALS[0][0] + " [SEP] Search\n\n"
            "Available Actions:\n{'has_search_bar': True, 'clickables': ['search']}"
        )
        item = next(text for text in shown if "Price: $12.99" in text)
        assert "'clickables': ['back to search', '< prev', 'description', 'buy now', 'jasmine', 'mint']" in item
    else:
        assert first[-1]["content"] == f"WebShop [SEP] Instruction: [SEP] {GOALS[0][0]} [SEP] Search"
        results = next(text for text in shown if "Total results" in text and "Green Tea" in text)
        assert results.startswith(
            "[Back to Search] [SEP] Page 1 (Total results: 1) [SEP] [Next >] [SEP] [B0TEA00001] [SEP] Green Tea"
        )
        assert "[mint]" in next(text for text in shown if "Price: $12.99" in text)


def test_episode_ends(server):
    rows = run(server, Scripted(lambda m: "I will buy the tea."), goals=[0])  # no action: ended, reward 0
    assert rows[0] | {"turns": None, "session": None} == {
        "prompt_id": "web-shop",
        "system": "base",
        "goal": 0,
        "session": None,
        "instruction": GOALS[0][0],
        "reward": 0.0,
        "ended": "invalid_action",
        "rounds": 1,
        "actions": [None],
        "turns": None,
        "error": None,
    }
    browse = Scripted(lambda m: "Action: search[tea]" if len(m) == 1 else "Action: click[next >]")  # never buys
    [row] = run(server, browse, goals=[1])
    assert row["ended"] == "round_limit" and row["rounds"] == ROUNDS and row["reward"] == 0.0
    assert len(row["turns"]) == 2 * ROUNDS and "Page 9 (Total results: 1)" in row["turns"][-2]["content"]
    stay = Scripted(lambda m: "Action: click[Nothing Here]" if len(m) < 3 else "Action: click[Buy Now]")
    [row] = run(server, stay, goals=[0])  # a click on nothing leaves the page as it is; no Buy Now on the search page
    assert row["turns"][0]["content"] == row["turns"][2]["content"] and row["ended"] == "round_limit"
    [row] = run(server, Scripted(lambda m: "Action: search[tea]"), goals=[7])  # the server fails: recorded
    assert row["ended"] == "error" and "500" in row["error"] and row["reward"] == 0.0


def test_half_reward_and_distinct_sessions(server):
    def no_options(messages):
        return (
            shopper()(messages[:1])
            if len(messages) == 1
            else ("Action: click[b0tea00001]" if len(messages) == 3 else "Action: click[Buy Now]")
        )

    WebShopLike.log.clear()
    rows = run(server, Scripted(no_options), goals=[0, 0])
    assert [r["reward"] for r in rows] == [0.5, 0.5] and rows[0]["session"] != rows[1]["session"]
    assert {parts[1] for method, parts in WebShopLike.log if parts[0] == "done" and method == "POST"} == {
        r["session"] for r in rows
    }


def test_check_server(server):
    assert check_server(server) == server
    with pytest.raises(InputError, match="needs --url URL"):
        check_server(None)
    with pytest.raises(InputError, match="no WebShop server answers there"):
        check_server("http://127.0.0.1:9")


def run_cli(*args):
    command = [sys.executable, "-m", "genpi.cli", "eval", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli(server, tiny_long_model, tmp_path):
    result = run_cli("webshop", "--catalog", EXAMPLES, "--prompt", "web-shop")
    assert result.returncode == 2 and "needs --url URL" in result.stderr
    out = tmp_path / "eval"
    result = run_cli(
        "webshop",
        "--url",
        server,
        "--catalog",
        EXAMPLES,
        "--prompt",
        "web-shop",
        "--base",
        tiny_long_model,
        "--goals",
        "2",
        "--max-new-tokens",
        "6",
        "--layout",
        "examples",
        "--out",
        out,
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert json.loads((out / "webshop.json").read_text()) == {"results": [summary]} and set(summary["systems"]) == {
        "teacher",
        "base",
    }
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT * FROM read_parquet('{out}/webshop/**/*.parquet', hive_partitioning=true) ORDER BY system, goal"
    ).fetchall()
    rows = [dict(zip([d[0] for d in con.description], r)) for r in rows]
    assert [(r["system"], r["goal"]) for r in rows] == [("base", 0), ("base", 1), ("teacher", 0), ("teacher", 1)]
    for r in rows:  # the tiny model's replies: the stored actions are what the stored replies hold
        replies = [t["content"] for t in r["turns"] if t["role"] == "assistant"]
        assert r["actions"] == [parse_action(t) for t in replies] and r["rounds"] == len(replies)
        assert (
            r["error"] is None
            and (r["ended"] == "invalid_action") == (r["actions"][-1] is None)
            and 0.0 <= r["reward"] <= 1.0
        )
    assert summary["systems"]["base"]["mean_reward"] == sum(r["reward"] for r in rows if r["system"] == "base") / 2
