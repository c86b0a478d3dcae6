"""The demo's stages (PAPER.md end to end), each a call into the code the commands run.

Every stage parses its own gin config (config.parse clears the previous one) and returns a
summary for its marker (stages.py). Paths live under the demo's workdir:

    classifier/   classifier-train workdir (model/, eval.json, eval.md)
    corpus/       the demo corpus (corpus.py), one file per source, SOURCES.md
    scores/       score shards (safejax score)        split/   score folders (safejax data split)
    synth/        rephrase/, refuseweb/, moral/ (safejax synth)
    lm/raw, lm/safe                  pretraining (ablation_raw, ablation_full)
    finetune/raw, finetune/safe      benign finetuning on GSM8K
    eval/<run>                       safejax eval run directories (results.json, report.md)
"""

from __future__ import annotations

import glob
import json
import os

from safejax import config, errors
from safejax.data.quarantine import QUARANTINE
from safejax.demo import corpus as corpus_lib
from safejax.demo.settings import DemoConfig
from safejax.demo.stages import Stage, finished

LM_RUNS = ("raw", "safe")
EVAL_RUNS = ("raw", "safe", "raw-gsm8k", "safe-gsm8k")


class Demo:
    def __init__(self, workdir: str, cfg: DemoConfig, base_url: str | None = None, model: str | None = None):
        self.dir, self.cfg, self.base_url, self.model = os.path.abspath(workdir), cfg, base_url, model

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def classifier(self) -> str:
        return self.path("classifier", "model")

    def corpus_files(self) -> list[str]:
        return sorted(glob.glob(self.path("corpus", "*.jsonl.gz")))

    def stages(self) -> list[Stage]:
        synth_backend = f"the endpoint {self.base_url} ({self.model})" if self.base_url else "the template backend"
        return [
            Stage("classifier", "train the safety classifier (demo recipe) and evaluate it against the baselines "
                                "on its snippet test split",
                  self.train_classifier),
            Stage("corpus", "compose the demo corpus from the bundled files (classifier test splits held out)",
                  self.compose_corpus),
            Stage("score", "score the demo corpus with the classifier (bf16, its document rule)", self.score),
            Stage("split", "split the scored corpus into score folders", self.split),
            Stage("synth", f"rephrase scores 1-3, RefuseWeb for 4-5, Moral Education, with {synth_backend} "
                           "and the classifier's quality gate", self.synthesize),
            Stage("pretrain_raw", "pretrain RAW (ablation_raw: every document)", lambda: self.pretrain("raw")),
            Stage("pretrain_safe", "pretrain SAFE (ablation_full: score-0, synthetic, tagged unsafe data) "
                                   "at RAW's size and token budget", lambda: self.pretrain("safe")),
            Stage("eval_raw", "evaluate RAW", lambda: self.evaluate("raw", self.path("lm", "raw"))),
            Stage("eval_safe", "evaluate SAFE", lambda: self.evaluate("safe", self.path("lm", "safe"))),
            Stage("finetune_raw", "benign finetuning of RAW on GSM8K", lambda: self.finetune("raw")),
            Stage("finetune_safe", "benign finetuning of SAFE on GSM8K", lambda: self.finetune("safe")),
            Stage("eval_raw_gsm8k", "evaluate RAW after finetuning",
                  lambda: self.evaluate("raw-gsm8k", self.path("finetune", "raw"))),
            Stage("eval_safe_gsm8k", "evaluate SAFE after finetuning",
                  lambda: self.evaluate("safe-gsm8k", self.path("finetune", "safe"))),
            Stage("report", "write the report", self.write_report),
        ]

    # ---- stages ----

    def train_classifier(self) -> dict:
        from safejax.train import classify

        from safejax.demo import classifier_figures

        config.parse(list(self.cfg.classifier_gin), ["ClassifierTrainConfig.evaluate = False"])
        summary = classify.train(self.path("classifier"))
        if summary["status"] != "completed":
            raise errors.UserError(f"classifier training stopped ({summary['status']}); rerun the demo to resume")
        figures = classifier_figures.evaluate(self.path("classifier"))
        return {**{k: summary.get(k) for k in ("step", "head_steps", "model", "cascade")},
                "test": {k: figures[k] for k in ("model", "baselines", "split")}}

    def compose_corpus(self) -> dict:
        from safejax.safety import documents, labeled
        from safejax.train import classify  # noqa: F401 (the classifier's configurables)

        config.parse(list(self.cfg.classifier_gin), [])  # its splits decide what is held out
        return corpus_lib.compose(self.path("corpus"), self.cfg, labeled.LabeledDataConfig(),
                                  documents.DocumentDataConfig())

    def score(self) -> dict:
        from safejax.safety import scoring

        summary = scoring.score_corpus(self.classifier, self.corpus_files(), self.path("scores"),
                                       batch_size=self.cfg.score_batch_size, dtype=self.cfg.score_dtype,
                                       rule=self.cfg.score_rule)
        return summary

    def _data_bindings(self) -> list[str]:
        shards = sorted(glob.glob(self.path("scores", "*.jsonl.gz")))
        return [f"CORPUS = {self.corpus_files()!r}", f"SCORES = {shards!r}"]

    def split(self) -> dict:
        from safejax.data import split

        config.parse(["data/safety.gin"], [*self._data_bindings(), *self.cfg.split_bindings])
        os.makedirs(self.path("split"), exist_ok=True)
        QUARANTINE.write_to(self.path("split", "quarantine.jsonl"))
        return split.split_by_score(self.path("split"))

    def synthesize(self) -> dict:
        from safejax.synth import run as synth

        bindings = []
        if self.base_url:
            bindings = ["SynthConfig.backend = 'endpoint'", f"ChatEndpoint.base_url = {self.base_url!r}",
                        f"ChatEndpoint.model = {self.model!r}"]
        out = {}
        folders = finished(self.dir, "split")["summary"]["documents"]
        for job, inputs in (("rephrase", [self.path("split")]), ("refuseweb", [self.path("split")]),
                            ("moral", [self.path("synth", "refuseweb")])):
            empty = _no_input(job, folders, out)
            if empty:  # the classifier put nothing in the job's score range: the report says so
                out[job] = {"skipped": empty, "items": 0, "kept": 0}
                continue
            config.parse(["synth/default.gin", *self.cfg.synth_gin], bindings)
            QUARANTINE.reset()  # each job counts its own set-aside records, as a command of its own would
            summary = synth.run(job, inputs, self.path("synth", job), self.classifier)
            if summary["failed"]:
                raise errors.UserError(f"synth {job}: {summary['failed']} records failed (see "
                                       f"{self.path('synth', job, 'failed.jsonl')}); rerun the demo to retry them")
            out[job] = {k: summary.get(k) for k in ("output", "backend", "model", "items", "kept", "rejected",
                                                    "invalid", "failed")}
        return out

    def pretrain(self, name: str) -> dict:
        from safejax.train import plan, pretrain

        bindings, dropped = [*self.cfg.lm_bindings, *self._data_bindings()], {}
        if name == "raw":
            files = [self.cfg.lm_gin, self.cfg.raw_ablation]
        else:
            synth = finished(self.dir, "synth")["summary"]
            files = [self.cfg.lm_gin, self.cfg.safe_ablation]
            bindings.append(f"SPLIT_DIR = {self.path('split')!r}")
            for macro, job in (("REPHRASED", "rephrase"), ("REFUSEWEB", "refuseweb"), ("MORAL_EDUCATION", "moral")):
                if synth[job].get("kept"):
                    bindings.append(f"{macro} = {[synth[job]['output']]!r}")
            extra, dropped = self._without_empty_kinds(files, bindings)
            bindings += extra
        config.parse(files, bindings)
        plan.check_composition()
        summary = pretrain.train(self.path("lm", name))
        return {**self._trained(summary, f"pretraining {name}"), **dropped}

    def _without_empty_kinds(self, files: list[str], bindings: list[str]) -> tuple[list[str], dict]:
        """Bindings for SAFE's mixture less the kinds with no data (an empty score folder or a
        synthesis job with nothing kept): the ablation's other kinds at their rates, recorded."""
        from safejax.data import tasks  # noqa: F401 (safety_data's configurable)

        import gin

        config.parse(files, bindings)
        mixture = gin.query_parameter("%MIXTURE")
        kinds = gin.query_parameter("safety_data.ablations")[mixture]
        folders = finished(self.dir, "split")["summary"]["documents"]
        synth = finished(self.dir, "synth")["summary"]
        empty = {k: why for k in kinds if (why := _empty_kind(k, folders, synth))}
        if not empty:
            return [], {}
        kept = [k for k in kinds if k not in empty]
        return ([f"safety_data.extra_ablations = {{'demo_safe': {kept!r}}}", "MIXTURE = 'demo_safe'"],
                {"mixture": f"{mixture} less {', '.join(empty)}", "dropped_kinds": empty})

    def finetune(self, name: str) -> dict:
        from safejax.evals import gsm8k
        from safejax.train import finetune, pretrain

        finetune.parse(self.path("lm", name), None, list(self.cfg.finetune_gin), list(self.cfg.finetune_bindings))
        summary = self._trained(pretrain.train(self.path("finetune", name)), f"finetuning {name}")
        accuracy = gsm8k.gsm8k_accuracy(self.path("finetune", name))
        if accuracy is not None:
            summary["gsm8k"] = accuracy
        return summary

    @staticmethod
    def _trained(summary: dict, what: str) -> dict:
        if summary["status"] != "completed":
            raise errors.UserError(f"{what} stopped ({summary['status']}); rerun the demo to resume")
        from safejax.data.pipeline import DataConfig

        keep = ("status", "step", "loss", "eval_loss", "eval_perplexity", "workdir")
        data = DataConfig()  # the bound run's
        tokens = summary["step"] * data.global_batch_size * data.seq_len
        return {**{k: summary[k] for k in keep if k in summary}, "tokens": tokens}

    def evaluate(self, label: str, checkpoint: str) -> dict:
        from safejax.evals import judges, report, run, stats, utility  # noqa: F401 (their configurables)

        bindings = [*self.cfg.eval_bindings, f"EvalConfig.clean_text = {self.path('corpus', corpus_lib.HELD_OUT_FILE)!r}"]
        run.parse(checkpoint, [], bindings)
        results = run.evaluate(checkpoint, self.path("eval", label), suites=list(self.cfg.suites),
                               decodings=list(self.cfg.decodings), judge_names=list(self.cfg.judges),
                               classifier=self.classifier, limit=self.cfg.limit, label=label)
        return run.summary_line(results, self.path("eval", label))

    def write_report(self) -> dict:
        from safejax.demo import report

        path = report.write(self)
        return {"report": path}


SCORE_FOLDERS = {"score_0": (0, 0), "score_1_3": (1, 3), "score_4_5": (4, 5)}
SYNTH_KINDS = {"rephrased": "rephrase", "refuseweb": "refuseweb", "moral_education": "moral"}
JOB_INPUTS = {"rephrase": "score_1_3", "refuseweb": "score_4_5"}  # the score folders each job reads


def _documents(folders: dict, low: int, high: int) -> int:
    return sum(folders.get(f"score_{s}", 0) for s in range(low, high + 1))


def _no_input(job: str, folders: dict, done: dict) -> str | None:
    """Why a synthesis job has nothing to read, or None."""
    if job == "moral":
        return None if done["refuseweb"].get("kept") else "no RefuseWeb dialogues to turn into articles"
    return _empty_kind(JOB_INPUTS[job], folders, {})


def _empty_kind(kind: str, folders: dict, synth: dict) -> str | None:
    """Why a mixture kind has no data in this demo, or None."""
    base = kind.removesuffix("_tagged")
    if base in SCORE_FOLDERS:
        low, high = SCORE_FOLDERS[base]
        return None if _documents(folders, low, high) else f"no documents scored {low}-{high}"
    if base in SYNTH_KINDS:
        job = synth[SYNTH_KINDS[base]]
        return None if job.get("kept") else job.get("skipped", f"synthesis kept no {base} records")
    return None


def load_results(demo: Demo, label: str) -> dict:
    with open(demo.path("eval", label, "results.json"), encoding="utf-8") as f:
        return json.load(f)
