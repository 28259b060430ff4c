"""Analyses of how a trained model routes: traces of single texts, domain specialization."""

from workbench.analysis.routing import RoutingTrace, domain_specialization, route_text

__all__ = ["RoutingTrace", "domain_specialization", "route_text"]
