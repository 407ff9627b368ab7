"""Tool calling benchmark: how often a real model calls a tool well, served by ``infera serve``.

Starts ``infera serve`` on Qwen2.5-Coder-1.5B-Instruct (``--model``; its chat template shows the
hermes format, so the parser is chosen from it) and sends 24 requests that each need one of six
tools, twice: with ``tool_choice: "auto"`` (the model decides; counted: a parseable call, i.e.
``tool_calls`` whose arguments are JSON, of a function among the tools; arguments that validate
against its schema; the function the prompt needs), and with ``"required"`` (the grammar forces a
call: counted the same, and every call's arguments must validate).  Greedy, ``max_tokens`` 160.

    python benchmarks/tools.py                          # needs `make models` (or infera models fetch)
    python benchmarks/tools.py --save-json docs/tools.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httpx
import jsonschema
from common import machine, save_json
from serve import LaunchedServer, free_port


def function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = [
    function("get_weather", "Current weather in a city",
             {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
    function("set_alarm", "Set an alarm", {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                           "minute": {"type": "integer", "minimum": 0, "maximum": 59},
                                           "label": {"type": "string"}}, ["hour", "minute"]),
    function("send_email", "Send an email", {"to": {"type": "string"}, "subject": {"type": "string"},
                                             "body": {"type": "string"}}, ["to", "subject", "body"]),
    function("convert_currency", "Convert an amount of money between currencies",
             {"amount": {"type": "number"}, "from_currency": {"type": "string", "description": "ISO code"},
              "to_currency": {"type": "string", "description": "ISO code"}},
             ["amount", "from_currency", "to_currency"]),
    function("search_web", "Search the web", {"query": {"type": "string"},
                                              "max_results": {"type": "integer", "minimum": 1, "maximum": 20}},
             ["query"]),
    function("create_event", "Add an event to the calendar",
             {"title": {"type": "string"}, "date": {"type": "string", "description": "YYYY-MM-DD"},
              "duration_minutes": {"type": "integer", "minimum": 1}}, ["title", "date"]),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

PROMPTS = [  # (request, the tool it needs)
    ("What's the weather like in Lisbon right now?", "get_weather"),
    ("Is it cold in Oslo today? Give me Fahrenheit.", "get_weather"),
    ("Tell me the current temperature in Nairobi.", "get_weather"),
    ("Do I need an umbrella in Seattle right now?", "get_weather"),
    ("Wake me up at 6:45 tomorrow.", "set_alarm"),
    ("Set an alarm for 13:30 labelled 'lunch meeting'.", "set_alarm"),
    ("I need an alarm at 22:00 to take my medicine.", "set_alarm"),
    ("Alarm at 7 o'clock sharp, please.", "set_alarm"),
    ("Email bob@example.com that the report is late, subject 'Report'.", "send_email"),
    ("Send an email to ana@corp.io thanking her for the review.", "send_email"),
    ("Write to team@startup.dev with subject 'Standup' saying it moves to 10am.", "send_email"),
    ("Let my landlord at rent@homes.com know the heater is broken.", "send_email"),
    ("How much is 250 US dollars in euros?", "convert_currency"),
    ("Convert 1000 JPY to GBP.", "convert_currency"),
    ("What are 75.5 Swiss francs in Canadian dollars?", "convert_currency"),
    ("I have 3 million Korean won; how many US dollars is that?", "convert_currency"),
    ("Search the web for the latest Python release notes.", "search_web"),
    ("Find me 5 articles about paged attention in LLM serving.", "search_web"),
    ("Look up who won the 2022 World Cup.", "search_web"),
    ("Search for vegetarian lasagna recipes, top 3 results.", "search_web"),
    ("Put 'Dentist' on my calendar for 2025-03-14, one hour.", "create_event"),
    ("Add a 30-minute 'Team sync' on 2025-07-01 to my calendar.", "create_event"),
    ("Schedule 'Mom's birthday dinner' on 2025-11-02.", "create_event"),
    ("Create a calendar event 'Flight to Rome' on 2025-05-20 lasting 150 minutes.", "create_event"),
]


def judge(choice: dict, needed: str) -> dict[str, bool]:
    """Whether the choice holds a parseable call (JSON arguments, a known function), whether all its
    calls' arguments validate, and whether it calls the function the prompt needs."""
    calls = choice["message"].get("tool_calls") or []
    parsed = []
    for c in calls:
        try:
            parsed.append((c["function"]["name"], json.loads(c["function"]["arguments"])))
        except ValueError:
            parsed.append((c["function"]["name"], None))
    parseable = bool(parsed) and all(name in SCHEMAS and isinstance(args, dict) for name, args in parsed)
    valid = parseable and all(jsonschema.Draft202012Validator(SCHEMAS[n]).is_valid(a) for n, a in parsed)
    return {"parseable": parseable, "valid": valid, "right_tool": parseable and parsed[0][0] == needed}


async def run(url: str, tool_choice: str, max_tokens: int, concurrency: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        async def one(prompt: str, needed: str) -> tuple[dict, float]:
            body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "tools": TOOLS,
                    "tool_choice": tool_choice, "max_tokens": max_tokens, "temperature": 0}
            async with limit:
                started = time.monotonic()
                r = await client.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                return r.json(), time.monotonic() - started

        started = time.monotonic()
        results = await asyncio.gather(*(one(p, t) for p, t in PROMPTS))
        wall = time.monotonic() - started
    verdicts = [judge(r["choices"][0], needed) for (r, _), (_, needed) in zip(results, PROMPTS)]
    n = len(PROMPTS)
    report = {"tool_choice": tool_choice, "requests": n, "wall_s": round(wall, 1),
              "latency_s_p50": round(statistics.median(t for _, t in results), 2),
              "completion_tokens": sum(r["usage"]["completion_tokens"] for r, _ in results),
              "finish_reasons": {f: sum(r["choices"][0]["finish_reason"] == f for r, _ in results)
                                 for f in ("tool_calls", "stop", "length")}}
    for key in ("parseable", "valid", "right_tool"):
        report[key] = sum(v[key] for v in verdicts)
        report[f"{key}_pct"] = round(100 * report[key] / n, 1)
    report["failures"] = [{"prompt": p, "message": r["choices"][0]["message"]}
                          for (r, _), (p, _), v in zip(results, PROMPTS, verdicts) if not v["valid"]][:5]
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--save-json")
    args = ap.parse_args()
    port = free_port()
    argv = [sys.executable, "-m", "infera.cli", "serve", "--model", args.model, "--port", str(port),
            "--served-model-name", "bench"]
    with LaunchedServer("infera", argv, port) as server:
        reports = [asyncio.run(run(server.url, choice, args.max_tokens, args.concurrency))
                   for choice in ("auto", "required")]
    for r in reports:
        print(f"tool_choice={r['tool_choice']}: {r['parseable']}/{r['requests']} parseable calls "
              f"({r['parseable_pct']}%), {r['valid']} with valid arguments ({r['valid_pct']}%), "
              f"{r['right_tool']} of the needed function ({r['right_tool_pct']}%); finish {r['finish_reasons']}; "
              f"{r['completion_tokens']} tokens in {r['wall_s']} s (p50 latency {r['latency_s_p50']} s)")
        for f in r["failures"]:
            print("   not valid:", f["prompt"], "->", json.dumps(f["message"])[:300])
    save_json(args.save_json, {"machine": machine(), "model": args.model, "max_tokens": args.max_tokens,
                               "reports": reports})


if __name__ == "__main__":
    main()
