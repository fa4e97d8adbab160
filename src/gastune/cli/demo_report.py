"""The demo's tables and its README section, written from the demo's results JSON.

``gastune demo --publish`` (``make demo-results``) writes ``docs/results/demo_cpu.json``, the
GAST selection heat map next to it, and replaces the README's text between
``<!-- demo-results:begin -->`` and ``<!-- demo-results:end -->`` with :func:`readme_block`
of that JSON, so the README's numbers are always the committed run's.
"""

from __future__ import annotations

from pathlib import Path

from gastune.errors import GastuneError

BEGIN = "<!-- demo-results:begin -->"
END = "<!-- demo-results:end -->"


def format_methods_table(results: dict) -> str:
    """One accuracy column per run (``before`` first), tasks as rows, then the average."""
    from gastune.eval.result import task_order

    names = list(results)
    tasks = task_order(set().union(*(r.tasks for r in results.values())))
    header = ["task", "n", *names]
    rows = []
    for task in tasks:
        n = next(r.tasks[task].n for r in results.values() if task in r.tasks)
        rows.append(
            [
                task,
                str(n),
                *(f"{r.tasks[task].accuracy:.3f}" if task in r.tasks else "-" for r in results.values()),
            ]
        )
    rows.append(["average", "", *(f"{r.average:.3f}" for r in results.values())])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]
    )


def cost_lines(training: dict, reference: str = "lora") -> list[str]:
    """One line per method: training time and peak memory, and their ratio to ``reference``."""
    ref = training.get(reference)
    lines = []
    for method, stats in training.items():
        text = f"{method}: trained in {stats['train_runtime']:.0f} s"
        if stats.get("peak_rss_bytes"):
            text += f", peak resident memory {stats['peak_rss_bytes'] / 2**30:.2f} GiB"
        if ref is not None and method != reference:
            text += f"; {stats['train_runtime'] / ref['train_runtime']:.2f}× {reference}'s time"
            if stats.get("peak_rss_bytes") and ref.get("peak_rss_bytes"):
                text += f", {stats['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}× its peak memory"
        lines.append(text)
    return lines


def readme_block(document: dict, json_path: str, image_path: str | None) -> str:
    """The README's demo-results section for a results document of ``gastune demo``."""
    from gastune.eval.result import EvalResult

    results = {name: EvalResult.from_dict(r) for name, r in document["results"].items()}
    settings = document["settings"]
    machine = document["machine"]
    commit = (document["git"].get("commit") or "unknown")[:7]
    dirty = " (with uncommitted changes)" if document["git"].get("dirty") else ""
    before = results["before"].average
    gains = ", ".join(
        f"{name} {before:.3f} → {r.average:.3f} ({r.average - before:+.3f})"
        for name, r in results.items()
        if name != "before"
    )
    lines = [
        f"The committed run, [`{json_path}`]({json_path}), is `{document['command_line']}` at commit "
        f"{commit}{dirty}, {document['date'][:10]}, on {machine['device_name']} with "
        f"{machine['torch_threads']} torch thread(s); it took {document['total_seconds']:.0f} s in all. "
        f"{settings['max_steps']} steps of {settings['batch_size']} examples per method "
        f"({settings['train_per_task']} training questions per task), "
        f"{settings['eval_per_task']} validation questions per task, "
        f"`{settings['format']}` format, `{document['rule']}` rule. Average accuracy: {gains}.",
        "",
        format_methods_table(results),
        "",
        *(f"- {line}" for line in cost_lines(document["training"])),
    ]
    if image_path:
        lines += ["", f"GAST's data × layer selection during the run ([{image_path}]({image_path})):", ""]
        lines.append(f"![GAST selection heat map]({image_path})")
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the demo-results markers replaced by ``block``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise GastuneError(f"the README has no '{BEGIN}' ... '{END}' section to update")
    return text[: start + len(BEGIN)] + "\n" + block + "\n" + text[end:]


def update_readme(readme: str | Path, block: str) -> Path:
    """Replace the demo-results section of ``readme`` with ``block`` (in place)."""
    readme = Path(readme)
    readme.write_text(replace_block(readme.read_text(), block))
    return readme
