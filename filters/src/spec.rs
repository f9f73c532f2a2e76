//! The filters a route may declare, as typed policy, and the order rules between them.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cache::{Cache, CacheConfig, CacheStore, RouteFacts};
use crate::chain::Filter;
use crate::request_id::{RequestId, RequestIdConfig};

/// One entry of a route's `filters:` list: the filter's name as the key, its settings as the value
/// (`- request_id: {}`). Unknown names and unknown settings are load-time errors.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FilterSpec {
    RequestId(RequestIdConfig),
    Cache(CacheConfig),
}

/// What a route's filters are built with: state that outlives the policy (handed in by the
/// process) and facts about the route.
pub struct BuildContext<'a> {
    pub cache: &'a Arc<CacheStore>,
    pub route: RouteFacts,
}

/// Where a filter must sit in a chain. A chain's stages never go backwards: a request must be
/// identified before it is authenticated, authenticated before it is limited, limited before the
/// cache answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Identify,
    Authenticate,
    Limit,
    Cache,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid header name {name:?}")]
    HeaderName { name: String },
    #[error("{}", problems.join("; "))]
    Invalid { problems: Vec<String> },
    #[error("filter `{filter}` is listed twice")]
    Duplicate { filter: &'static str },
    #[error("filter `{later}` ({later_stage:?} stage) must come before `{earlier}` ({earlier_stage:?} stage)")]
    OutOfOrder {
        earlier: &'static str,
        earlier_stage: Stage,
        later: &'static str,
        later_stage: Stage,
    },
}

impl FilterSpec {
    pub fn name(&self) -> &'static str {
        match self {
            FilterSpec::RequestId(_) => "request_id",
            FilterSpec::Cache(_) => "cache",
        }
    }

    pub fn stage(&self) -> Stage {
        match self {
            FilterSpec::RequestId(_) => Stage::Identify,
            FilterSpec::Cache(_) => Stage::Cache,
        }
    }

    /// Builds the filter. State that must outlive a reload (the cache's store) is not created
    /// here but handed in by the process.
    pub fn build(&self, context: &BuildContext<'_>) -> Result<Arc<dyn Filter>, SpecError> {
        match self {
            FilterSpec::Cache(config) => {
                let problems = config.problems(context.cache.config());
                if !problems.is_empty() {
                    return Err(SpecError::Invalid { problems });
                }
                let cache =
                    Cache::new(config.clone(), context.cache.clone(), context.route.clone());
                Ok(Arc::new(cache))
            }
            FilterSpec::RequestId(config) => RequestId::new(config)
                .map(|filter| Arc::new(filter) as Arc<dyn Filter>)
                .map_err(|_| SpecError::HeaderName {
                    name: config.header.clone(),
                }),
        }
    }

    /// The filters a route gets when it declares none.
    pub fn defaults() -> Vec<FilterSpec> {
        vec![FilterSpec::RequestId(RequestIdConfig::default())]
    }

    /// Checks a declared order: no filter twice, stages never going backwards.
    pub fn validate_order(specs: &[FilterSpec]) -> Vec<SpecError> {
        let mut errors = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            if specs[..i]
                .iter()
                .any(|earlier| earlier.name() == spec.name())
            {
                errors.push(SpecError::Duplicate {
                    filter: spec.name(),
                });
            }
            if let Some(earlier) = specs[..i]
                .iter()
                .find(|earlier| earlier.stage() > spec.stage())
            {
                errors.push(SpecError::OutOfOrder {
                    earlier: earlier.name(),
                    earlier_stage: earlier.stage(),
                    later: spec.name(),
                    later_stage: spec.stage(),
                });
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused() {
        let specs = vec![
            FilterSpec::defaults().remove(0),
            FilterSpec::defaults().remove(0),
        ];
        let errors = FilterSpec::validate_order(&specs);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("listed twice"));
    }

    #[test]
    fn stages_are_ordered() {
        assert!(Stage::Identify < Stage::Authenticate);
        assert!(Stage::Authenticate < Stage::Limit);
        assert!(Stage::Limit < Stage::Cache);
    }

    #[test]
    fn bad_header_names_fail_at_build() {
        let spec = FilterSpec::RequestId(RequestIdConfig {
            header: "bad header".into(),
            trust_incoming: true,
        });
        let store = Arc::new(CacheStore::new(
            Default::default(),
            Default::default(),
            None,
        ));
        let context = BuildContext {
            cache: &store,
            route: RouteFacts {
                route: "r".into(),
                upstream: "u".into(),
                api: "openai".into(),
                credential_scoped: false,
            },
        };
        assert!(spec.build(&context).is_err());
        assert!(FilterSpec::defaults()[0].build(&context).is_ok());
        let oversized = FilterSpec::Cache(CacheConfig {
            max_entry: crate::units::ByteSize(1 << 40),
            ..CacheConfig::default()
        });
        let error = oversized.build(&context).err().unwrap().to_string();
        assert!(error.contains("larger than the store's"), "{error}");
    }
}
