"""Tier 2: the causal LMs the sweep (OSDI_Evaluation/zoo/sweep_causal_lm.py) added to the module path.

Every class that passed all of the sweep's checks (results/causal_lm_sweep.json) and was not on the
allow-list before is built from the sweep's own tiny config (2 layers, hidden 64, vocabulary 256,
position limit 64, seeded weights), remoted to the shared server (the default allow-list, so nothing
extends it for the test), and must give a local greedy `generate`'s tokens bitwise, then refuse a
generate past its length limit with InvalidRequest before any kernel: past its position table where it
has one (learned, or a fixed sin/cos buffer: validate.limits_of), else past generate's token bound (a
rotary or ALiBi model has no table). The sweep itself checks sampling, session continuation and the
token and length boundaries for each; this keeps the allow-list honest at a few seconds' cost.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import djinn
from djinn.config import DEFAULT_ARCHITECTURES
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.server.execution.executor import MAX_GENERATE_TOKENS
from djinn.server.execution.validate import limits_of

_SWEEP = Path(__file__).resolve().parents[2] / "OSDI_Evaluation" / "zoo" / "sweep_causal_lm.py"
_spec = importlib.util.spec_from_file_location("sweep_causal_lm", _SWEEP)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])
#: class -> the model type the sweep builds it from: the classes the sweep added to DEFAULT_ARCHITECTURES.
ADDED = {
    "Apertus1p5TextForCausalLM": "apertus1p5_text",
    "ApertusForCausalLM": "apertus",
    "ArceeForCausalLM": "arcee",
    "AriaTextForCausalLM": "aria_text",
    "BertGenerationDecoder": "bert-generation",
    "BertLMHeadModel": "bert",
    "BigBirdForCausalLM": "big_bird",
    "BioGptForCausalLM": "biogpt",
    "BitNetForCausalLM": "bitnet",
    "CTRLLMHeadModel": "ctrl",
    "CamembertForCausalLM": "camembert",
    "CodeGenForCausalLM": "codegen",
    "Data2VecTextForCausalLM": "data2vec-text",
    "DiffLlamaForCausalLM": "diffllama",
    "DogeForCausalLM": "doge",
    "Dots1ForCausalLM": "dots1",
    "ElectraForCausalLM": "electra",
    "Ernie4_5ForCausalLM": "ernie4_5",
    "Ernie4_5_MoeForCausalLM": "ernie4_5_moe",
    "FlexOlmoForCausalLM": "flex_olmo",
    "GPTBigCodeForCausalLM": "gpt_bigcode",
    "GPTNeoXJapaneseForCausalLM": "gpt_neox_japanese",
    "Glm4ForCausalLM": "glm4",
    "Glm4MoeForCausalLM": "glm4_moe",
    "GlmForCausalLM": "glm",
    "GraniteForCausalLM": "granite",
    "GraniteMoeForCausalLM": "granitemoe",
    "GraniteMoeSharedForCausalLM": "granitemoeshared",
    "HYV3ForCausalLM": "hy_v3",
    "HeliumForCausalLM": "helium",
    "HunYuanDenseV1ForCausalLM": "hunyuan_v1_dense",
    "HunYuanMoEV1ForCausalLM": "hunyuan_v1_moe",
    "HyperCLOVAXForCausalLM": "hyperclovax",
    "Jais2ForCausalLM": "jais2",
    "JetMoeForCausalLM": "jetmoe",
    "LagunaForCausalLM": "laguna",
    "MegatronBertForCausalLM": "megatron-bert",
    "MellumForCausalLM": "mellum",
    "MiniCPM5MoeForCausalLM": "minicpm5_moe",
    "MiniMaxM2ForCausalLM": "minimax_m2",
    "MiniMaxM3VLForCausalLM": "minimax_m3_vl_text",
    "Ministral3ForCausalLM": "ministral3",
    "NanoChatForCausalLM": "nanochat",
    "NemotronForCausalLM": "nemotron",
    "Olmo2ForCausalLM": "olmo2",
    "OlmoForCausalLM": "olmo",
    "OlmoeForCausalLM": "olmoe",
    "PersimmonForCausalLM": "persimmon",
    "PhimoeForCausalLM": "phimoe",
    "RemBertForCausalLM": "rembert",
    "RoFormerForCausalLM": "roformer",
    "RobertaForCausalLM": "roberta",
    "RobertaPreLayerNormForCausalLM": "roberta-prelayernorm",
    "SeedOssForCausalLM": "seed_oss",
    "SmolLM3ForCausalLM": "smollm3",
    "SolarOpenForCausalLM": "solar_open",
    "Starcoder2ForCausalLM": "starcoder2",
    "TrOCRForCausalLM": "trocr",
    "XGLMForCausalLM": "xglm",
    "XLMRobertaForCausalLM": "xlm-roberta",
    "XLMRobertaXLForCausalLM": "xlm-roberta-xl",
    "BigBirdPegasusForCausalLM": "bigbird_pegasus",
    "CohereCompassForCausalLM": "cohere_compass_text",
    "DbrxForCausalLM": "dbrx",
    "Emu3ForCausalLM": "emu3",
    "MvpForCausalLM": "mvp",
    "XLNetLMHeadModel": "xlnet",
    "BartForCausalLM": "bart",
    "BlenderbotSmallForCausalLM": "blenderbot-small",
    "MBartForCausalLM": "mbart",
    "MarianForCausalLM": "marian",
    "PLBartForCausalLM": "plbart",
}


@pytest.fixture(scope="module")
def session(server):
    conn = Connection(server.address, secret=None)
    s = conn.session("zoo-sweep")
    yield s
    s.close()
    conn.close()


def test_the_added_classes_are_allow_listed():
    assert set(ADDED) <= set(DEFAULT_ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(ADDED))
def test_added_causal_lm_generates_bitwise_and_refuses_past_its_length(session, arch):
    import transformers

    if not hasattr(transformers, arch):   # an older transformers: the server refuses it, nothing to compare
        pytest.skip(f"transformers {transformers.__version__} has no {arch}")
    _, model = sweep.build(arch, ADDED[arch])
    rm = RemoteModel.from_module(session, model)
    assert rm.path == "module" and rm.arch == arch
    greedy = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        ref = model.generate(IDS, **greedy)
    assert torch.equal(rm.generate(IDS, **greedy), ref)
    table = limits_of(model).positions
    if table is not None:   # a prompt that fits, and new tokens that do not
        long = torch.randint(3, 200, (1, table - 2), generator=torch.Generator().manual_seed(0))
        with pytest.raises(djinn.InvalidRequest, match=rf"position table of {table}"):
            rm.generate(long, max_new_tokens=4, do_sample=False)
    else:
        with pytest.raises(djinn.InvalidRequest, match=r"max_new_tokens"):
            rm.generate(IDS, max_new_tokens=MAX_GENERATE_TOKENS + 1)
    assert torch.equal(rm.generate(IDS, **greedy), ref)   # refused before any kernel: it serves on
