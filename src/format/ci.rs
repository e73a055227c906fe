//! The CI job a run came from: the [`Ci`] context a manifest and a run record carry, read
//! from the documented environment variables of GitHub Actions, GitLab CI, Buildkite, Jenkins
//! and CircleCI.

use serde::{Deserialize, Serialize};

/// The CI job a run came from, read from the provider's documented environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Ci {
    /// `github-actions`, `gitlab-ci`, `buildkite`, `jenkins` or `circleci`.
    pub provider: String,
    /// Repository (`owner/name`, a project path or a clone URL, as the provider gives it).
    pub repository: Option<String>,
    /// Branch (for pull/merge requests: the source branch).
    pub branch: Option<String>,
    /// Tag, for tag builds.
    pub tag: Option<String>,
    /// Commit SHA.
    pub commit: Option<String>,
    /// Pull or merge request number.
    pub pull_request: Option<String>,
    /// Build, pipeline or workflow-run id.
    pub build: Option<String>,
    /// Job name.
    pub job: Option<String>,
    /// Link to the job or build.
    pub url: Option<String>,
    /// For a pull or merge request: the branch it would merge into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

/// The CI context from environment variables (`var` reads one; empty counts as unset), or
/// `None` outside the supported providers.
pub(crate) fn ci_context(var: impl Fn(&str) -> Option<String>) -> Option<Ci> {
    let v = |k: &str| var(k).filter(|s| !s.is_empty());
    let is = |k: &str, want: &str| v(k).is_some_and(|s| s.eq_ignore_ascii_case(want));
    if is("GITHUB_ACTIONS", "true") {
        return Some(github_actions(&v));
    }
    if is("GITLAB_CI", "true") {
        return Some(gitlab_ci(&v));
    }
    if is("BUILDKITE", "true") {
        return Some(buildkite(&v));
    }
    if is("CIRCLECI", "true") {
        return Some(circleci(&v));
    }
    if v("JENKINS_URL").is_some() {
        return Some(jenkins(&v));
    }
    None
}

/// The GitHub Actions job, from its `GITHUB_*` variables (`v` reads one, empty as unset).
fn github_actions(v: &impl Fn(&str) -> Option<String>) -> Ci {
    let tag = (v("GITHUB_REF_TYPE").as_deref() == Some("tag"))
        .then(|| v("GITHUB_REF_NAME"))
        .flatten();
    let branch = v("GITHUB_HEAD_REF").or_else(|| {
        (v("GITHUB_REF_TYPE").as_deref() == Some("branch"))
            .then(|| v("GITHUB_REF_NAME"))
            .flatten()
    });
    let pull_request = v("GITHUB_REF").and_then(|r| {
        r.strip_prefix("refs/pull/")
            .and_then(|r| r.split('/').next())
            .map(str::to_string)
    });
    let url = match (
        v("GITHUB_SERVER_URL"),
        v("GITHUB_REPOSITORY"),
        v("GITHUB_RUN_ID"),
    ) {
        (Some(s), Some(r), Some(id)) => Some(match v("GITHUB_RUN_ATTEMPT") {
            Some(a) => format!("{s}/{r}/actions/runs/{id}/attempts/{a}"),
            None => format!("{s}/{r}/actions/runs/{id}"),
        }),
        _ => None,
    };
    Ci {
        provider: "github-actions".into(),
        repository: v("GITHUB_REPOSITORY"),
        branch,
        tag,
        commit: v("GITHUB_SHA"),
        pull_request,
        build: v("GITHUB_RUN_ID"),
        job: v("GITHUB_JOB"),
        url,
        base: v("GITHUB_BASE_REF"),
    }
}

/// The GitLab CI job, from its `CI_*` variables (`v` reads one, empty as unset).
fn gitlab_ci(v: &impl Fn(&str) -> Option<String>) -> Ci {
    Ci {
        provider: "gitlab-ci".into(),
        repository: v("CI_PROJECT_PATH"),
        branch: v("CI_COMMIT_BRANCH").or_else(|| v("CI_MERGE_REQUEST_SOURCE_BRANCH_NAME")),
        tag: v("CI_COMMIT_TAG"),
        commit: v("CI_COMMIT_SHA"),
        pull_request: v("CI_MERGE_REQUEST_IID"),
        build: v("CI_PIPELINE_ID"),
        job: v("CI_JOB_NAME"),
        url: v("CI_JOB_URL"),
        base: v("CI_MERGE_REQUEST_TARGET_BRANCH_NAME"),
    }
}

/// The Buildkite job, from its `BUILDKITE_*` variables (`v` reads one, empty as unset).
fn buildkite(v: &impl Fn(&str) -> Option<String>) -> Ci {
    let url = v("BUILDKITE_BUILD_URL").map(|u| match v("BUILDKITE_JOB_ID") {
        Some(j) => format!("{u}#{j}"),
        None => u,
    });
    Ci {
        provider: "buildkite".into(),
        repository: v("BUILDKITE_REPO"),
        branch: v("BUILDKITE_BRANCH"),
        tag: v("BUILDKITE_TAG"),
        commit: v("BUILDKITE_COMMIT"),
        pull_request: v("BUILDKITE_PULL_REQUEST").filter(|p| p != "false"),
        build: v("BUILDKITE_BUILD_NUMBER"),
        job: v("BUILDKITE_LABEL"),
        url,
        base: v("BUILDKITE_PULL_REQUEST_BASE_BRANCH")
            .filter(|_| v("BUILDKITE_PULL_REQUEST").is_some_and(|p| p != "false")),
    }
}

/// The CircleCI job, from its `CIRCLE_*` variables (`v` reads one, empty as unset).
fn circleci(v: &impl Fn(&str) -> Option<String>) -> Ci {
    let repository = match (v("CIRCLE_PROJECT_USERNAME"), v("CIRCLE_PROJECT_REPONAME")) {
        (Some(u), Some(r)) => Some(format!("{u}/{r}")),
        _ => v("CIRCLE_REPOSITORY_URL"),
    };
    let pull_request = v("CIRCLE_PR_NUMBER").or_else(|| {
        v("CIRCLE_PULL_REQUEST").and_then(|u| u.rsplit('/').next().map(str::to_string))
    });
    Ci {
        provider: "circleci".into(),
        repository,
        branch: v("CIRCLE_BRANCH"),
        tag: v("CIRCLE_TAG"),
        commit: v("CIRCLE_SHA1"),
        pull_request,
        build: v("CIRCLE_BUILD_NUM"),
        job: v("CIRCLE_JOB"),
        url: v("CIRCLE_BUILD_URL"),
        // CircleCI does not name a pull request's base branch.
        base: None,
    }
}

/// The Jenkins build, from its job and Git plugin variables (`v` reads one, empty as unset).
fn jenkins(v: &impl Fn(&str) -> Option<String>) -> Ci {
    Ci {
        provider: "jenkins".into(),
        repository: v("GIT_URL"),
        branch: v("CHANGE_BRANCH")
            .or_else(|| v("BRANCH_NAME"))
            .or_else(|| v("GIT_BRANCH")),
        tag: v("TAG_NAME"),
        commit: v("GIT_COMMIT"),
        pull_request: v("CHANGE_ID"),
        build: v("BUILD_NUMBER"),
        job: v("JOB_NAME"),
        url: v("BUILD_URL"),
        base: v("CHANGE_TARGET"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn github_pull_request_and_gitlab_tag() {
        let gh = ci_context(env(&[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_REPOSITORY", "o/r"),
            ("GITHUB_REF", "refs/pull/42/merge"),
            ("GITHUB_REF_NAME", "42/merge"),
            ("GITHUB_REF_TYPE", "branch"),
            ("GITHUB_HEAD_REF", "feature"),
            ("GITHUB_SHA", "abc"),
            ("GITHUB_SERVER_URL", "https://github.com"),
            ("GITHUB_RUN_ID", "7"),
            ("GITHUB_JOB", "test"),
        ]))
        .unwrap();
        assert_eq!(gh.pull_request.as_deref(), Some("42"));
        assert_eq!(gh.branch.as_deref(), Some("feature"));
        assert_eq!(gh.tag, None);
        assert_eq!(
            gh.url.as_deref(),
            Some("https://github.com/o/r/actions/runs/7")
        );
        let gl = ci_context(env(&[
            ("GITLAB_CI", "true"),
            ("CI_COMMIT_TAG", "v1.0"),
            ("CI_COMMIT_BRANCH", ""),
            ("CI_JOB_NAME", "unit"),
        ]))
        .unwrap();
        assert_eq!(
            (gl.provider.as_str(), gl.tag.as_deref(), gl.branch),
            ("gitlab-ci", Some("v1.0"), None)
        );
        assert_eq!(ci_context(env(&[("HOME", "/root")])), None);
        let bk = ci_context(env(&[
            ("BUILDKITE", "true"),
            ("BUILDKITE_PULL_REQUEST", "false"),
        ]));
        assert_eq!(bk.unwrap().pull_request, None);
    }
}
