//! Evaluates one request (action and resource) against one policy document alone, as IAM
//! does: an explicit Deny wins, then an Allow, otherwise the default (implicit) deny. Conditions
//! and policy variables are not evaluated: a statement that depends on them is reported as
//! undecided, never guessed.

use super::document::{Effect, Policy, Statement, Targets};
use super::pattern::{self, action_matches, resource_matches};

/// Whether one statement applies to the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applies {
    Yes,
    /// It does not, and why.
    No(&'static str),
    /// It would, but only IAM can tell: a condition or a policy variable decides.
    Unknown(&'static str),
}

/// The outcome for the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by this statement (the first that allows, with no Deny that might apply).
    Allowed(usize),
    /// Explicitly denied by this statement (the first Deny that applies).
    Denied(usize),
    /// No statement allows.
    ImplicitDeny,
    /// Depends on a condition or variable of this statement.
    Undecided(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// One verdict per statement, in document order.
    pub statements: Vec<Applies>,
    pub decision: Decision,
}

impl Evaluation {
    pub fn is_allowed(&self) -> bool {
        matches!(self.decision, Decision::Allowed(_))
    }
}

/// Evaluates `action` on `resource` against `policy` alone.
pub fn evaluate(policy: &Policy, action: &str, resource: &str) -> Evaluation {
    let statements: Vec<Applies> = policy
        .statements
        .iter()
        .map(|s| applies(s, action, resource))
        .collect();
    let first = |effect: Effect, want: fn(&Applies) -> bool| {
        policy
            .statements
            .iter()
            .zip(&statements)
            .position(|(s, a)| s.effect == effect && want(a))
    };
    let yes = |a: &Applies| *a == Applies::Yes;
    let unknown = |a: &Applies| matches!(a, Applies::Unknown(_));
    let decision = if let Some(i) = first(Effect::Deny, yes) {
        Decision::Denied(i)
    } else {
        match (
            first(Effect::Allow, yes),
            first(Effect::Allow, unknown),
            first(Effect::Deny, unknown),
        ) {
            // Something may allow, and a Deny that may apply decides whether it is denied.
            (Some(_), _, Some(deny)) | (None, Some(_), Some(deny)) => Decision::Undecided(deny),
            (Some(allow), _, None) => Decision::Allowed(allow),
            (None, Some(allow), None) => Decision::Undecided(allow),
            (None, None, _) => Decision::ImplicitDeny,
        }
    };
    Evaluation {
        statements,
        decision,
    }
}

/// Whether `statement` applies to the request, before its effect is considered.
pub fn applies(statement: &Statement, action: &str, resource: &str) -> Applies {
    if !covers(&statement.action, |p| action_matches(p, action)) {
        return Applies::No(if statement.action.negated {
            "the action is excluded by NotAction"
        } else {
            "the action is not in Action"
        });
    }
    let resource_hit = covers(&statement.resource, |p| resource_matches(p, resource));
    let variables = statement
        .resource
        .patterns
        .iter()
        .any(|p| pattern::has_variable(&p.value));
    if !resource_hit {
        if variables {
            return Applies::Unknown(
                "a resource uses a policy variable (${...}), not resolved here",
            );
        }
        return Applies::No(if statement.resource.negated {
            "the resource is excluded by NotResource"
        } else {
            "the resource is not in Resource"
        });
    }
    if statement.resource.negated && variables {
        return Applies::Unknown("NotResource uses a policy variable (${...}), not resolved here");
    }
    if statement.condition.is_some() {
        return Applies::Unknown("it has a Condition, which this evaluator does not decide");
    }
    Applies::Yes
}

/// Whether `Action`/`Resource` (or their negation) covers the request part `hit` tests.
fn covers(targets: &Targets, hit: impl Fn(&str) -> bool) -> bool {
    let any = targets.patterns.iter().any(|p| hit(&p.value));
    any != targets.negated
}
