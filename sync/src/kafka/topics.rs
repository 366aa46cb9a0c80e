//! Creating the topics the uplink writes to, when the operator allows it (`create_topics`).
//! HQ usually provisions topics itself; for a demo or a small fleet the agent creates them with the
//! configured partition count. The checkpoint topic is always created compacted.

use super::checkpoint::ArcContext;
use super::client::LinkContext;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use std::sync::Arc;
use std::time::Duration;

/// One topic to create.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub compacted: bool,
}

/// Creates the topics that do not exist. Returns a sentence per topic that could not be created
/// (already existing topics are fine).
pub async fn ensure_topics(
    base: &ClientConfig,
    context: Arc<LinkContext>,
    topics: &[TopicSpec],
    partitions: i32,
    replication: i32,
) -> Vec<String> {
    if topics.is_empty() {
        return Vec::new();
    }
    let admin: AdminClient<ArcContext> = match base.create_with_context(ArcContext(context)) {
        Ok(a) => a,
        Err(e) => return vec![format!("cannot create the Kafka admin client: {e}")],
    };
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let n = NewTopic::new(&t.name, partitions, TopicReplication::Fixed(replication));
            if t.compacted {
                n.set("cleanup.policy", "compact")
            } else {
                n
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let fut = admin.create_topics(new.iter(), &opts);
    match tokio::time::timeout(Duration::from_secs(15), fut).await {
        Err(_) => vec!["creating topics timed out after 15s".into()],
        Ok(Err(e)) => vec![format!("creating topics failed: {e}")],
        Ok(Ok(results)) => results
            .into_iter()
            .filter_map(|r| match r {
                Ok(_) => None,
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => None,
                Err((name, code)) => Some(format!("topic {name} could not be created: {code}")),
            })
            .collect(),
    }
}
