"""Planning: run configurations, presets, the sigma schedule, the plan of a generation, budgets and ComfyUI workflow import. No torch."""
