from __future__ import annotations

from pathlib import Path

import pytest

from kit.errors import PresetError
from kit.presets import load_preset, preset_names


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_presets_are_valid():
    names = preset_names()
    assert {"demo", "sdxl-turbo", "sd-turbo", "sdxl"} <= set(names)
    for name in names:
        assert load_preset(name).name == name


def test_turbo_presets_use_few_steps_without_guidance():
    for name in ("sdxl-turbo", "sd-turbo"):
        preset = load_preset(name)
        assert preset.generator.limits.max_steps == 4
        assert preset.generator.defaults.guidance_scale == 0.0
        assert preset.generator.defaults.width == 512
        assert preset.describe.model == "Salesforce/blip-image-captioning-large"


def test_sdxl_preset_uses_fp16_fix_vae():
    assert load_preset("sdxl").generator.vae == "madebyollin/sdxl-vae-fp16-fix"


def test_three_line_preset_works(tmp_path):
    path = write(tmp_path, '[site]\ntitle = "Mine"\n[generator]\nmodel = "builtin:tiny-sd"\n')
    preset = load_preset(str(path))
    assert preset.site.title == "Mine"
    assert preset.queue.max_size >= 1
    assert preset.gallery.scope == "private"


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "[generator]\nmodle = 'x'\n")
    with pytest.raises(PresetError) as caught:
        load_preset(str(path))
    message = str(caught.value)
    assert str(path) in message
    assert "generator.modle" in message
    assert "unknown key" in message


def test_bad_value_names_key_value_and_rule(tmp_path):
    path = write(tmp_path, "[gallery]\nscope = 'everyone'\n")
    with pytest.raises(PresetError) as caught:
        load_preset(str(path))
    message = str(caught.value)
    assert "gallery.scope" in message
    assert "'everyone'" in message
    assert "private" in message and "shared" in message


def test_default_outside_limits_is_rejected(tmp_path):
    path = write(tmp_path, "[generator.defaults]\nsteps = 80\n[generator.limits]\nmax_steps = 50\n")
    with pytest.raises(PresetError, match="defaults.steps \\(80\\) is outside limits \\[1, 50\\]"):
        load_preset(str(path))


def test_unknown_visitor_parameter_is_rejected(tmp_path):
    path = write(tmp_path, "[generator]\nvisitor_parameters = ['seed', 'colour']\n")
    with pytest.raises(PresetError, match="colour"):
        load_preset(str(path))


def test_toml_syntax_error_gives_hints(tmp_path):
    path = write(tmp_path, "[site]\ntitle = My site\n")
    with pytest.raises(PresetError) as caught:
        load_preset(str(path))
    assert "not valid TOML" in str(caught.value)
    assert "unquoted strings" in str(caught.value)


def test_missing_preset_lists_shipped_ones():
    with pytest.raises(PresetError, match="shipped presets: .*demo"):
        load_preset("no-such-preset")
