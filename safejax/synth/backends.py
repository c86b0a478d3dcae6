"""The `endpoint` backend: any OpenAI-compatible chat endpoint (vLLM, TGI, SGLang, a hosted API,
or `safejax serve`) through the labeler's client (safety/openai_client.py: retries with backoff
on 429, 5xx and timeouts, the key from an environment variable and never logged).

Each item is one chat request: the job's prompt (synth/prompts.py) as system and user messages.
A reply that is not a usable output (synth/replies.py) gets ONE repair request that shows the
model its reply and what was wrong; a reply still unusable is returned with both raw texts, to be
kept in invalid.jsonl. The template backend is synth/template.py.
"""

from __future__ import annotations

from safejax.safety.openai_client import ChatClient, RequestFailed
from safejax.synth import replies
from safejax.synth.jobs import Item, Outcome
from safejax.synth.prompts import Prompt


class EndpointBackend:
    name = "endpoint"

    def __init__(self, client: ChatClient, prompt: Prompt):
        self.client, self.prompt = client, prompt
        self.model, self.sha = client.endpoint.model, prompt.sha

    def produce(self, job: str, item: Item) -> Outcome:
        parse = replies.PARSERS[job]
        values = {"text": item.text, "piece": item.piece + 1, "pieces": item.pieces, "user": item.roles[0],
                  "assistant": item.roles[1], "dialogue": item.text}
        messages = self.prompt.messages(values, item.style)
        tokens = [0, 0]

        def ask(msgs):
            reply = self.client.chat(msgs)
            tokens[0] += reply.prompt_tokens
            tokens[1] += reply.completion_tokens
            return reply

        try:
            reply = ask(messages)
            try:
                return Outcome(parse(reply), tokens_in=tokens[0], tokens_out=tokens[1])
            except replies.InvalidOutput as first:
                repair = ask(self.prompt.repair(messages, reply.content, str(first)))
            try:
                return Outcome(parse(repair), repaired=True, tokens_in=tokens[0], tokens_out=tokens[1])
            except replies.InvalidOutput as second:
                return Outcome(error=str(second), raw=reply.content, repair_raw=repair.content,
                               tokens_in=tokens[0], tokens_out=tokens[1])
        except RequestFailed as e:
            return Outcome(error=str(e), failed=True, tokens_in=tokens[0], tokens_out=tokens[1])
