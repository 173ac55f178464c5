"""The figures the serving metrics count, read from a response's usage (pure)."""

from frugalray.serve.metrics import request_figures


def test_figures_come_from_the_usage_clients_see():
    usage = {"prompt_tokens": 9, "completion_tokens": 21, "total_tokens": 30,
             "frugalray": {"samples": 4, "flops": 2.5e10, "strategy": "cascade", "stopped_early": True,
                           "escalated": True}}
    assert request_figures(usage) == {"samples": 4.0, "completion_tokens": 21.0, "flops": 2.5e10,
                                      "early_stops": 1.0, "escalations": 1.0}
    plain = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14, "frugalray": {"samples": 1}}
    assert request_figures(plain) == {"samples": 1.0, "completion_tokens": 5.0, "flops": 0.0, "early_stops": 0.0,
                                      "escalations": 0.0}
    # a stream: no usage here, one sample of unknown length
    assert request_figures(None)["samples"] == 1.0 and request_figures(None)["completion_tokens"] == 0.0
