//! The shutdown tree: every background task runs under a [`Tasks`] node, which pairs a
//! cancellation token with a task tracker. A child node's token is a child of its parent's, and
//! its tasks are tracked by every node above it too, so the root cancels and waits for
//! everything while a subtree (the credential cache, the listeners) can be stopped on its own.
//! Tasks carry a name, so a shutdown that overruns can say which ones are left.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One node of the shutdown tree; clones share it.
#[derive(Clone)]
pub struct Tasks {
    token: CancellationToken,
    /// This node first, then its ancestors up to the root.
    nodes: Vec<Arc<Node>>,
}

#[derive(Default)]
struct Node {
    tracker: TaskTracker,
    /// Running tasks of this subtree by name.
    running: Mutex<BTreeMap<&'static str, usize>>,
}

impl Node {
    fn count(&self, name: &'static str, up: bool) {
        let mut running = self.running.lock().expect("task names lock");
        let n = running.entry(name).or_default();
        if up {
            *n += 1;
        } else {
            *n -= 1;
            if *n == 0 {
                running.remove(name);
            }
        }
    }
}

/// Counts a task as running in every node of its path until it is dropped (it ended, or the
/// runtime dropped it).
struct Running {
    name: &'static str,
    nodes: Vec<Arc<Node>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.count(self.name, false);
        }
    }
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Tasks {
    /// A root: a tree of its own.
    pub fn new() -> Self {
        Self {
            token: CancellationToken::new(),
            nodes: vec![Arc::default()],
        }
    }

    /// A node under this one: cancelled with it, its tasks waited for by it.
    pub fn child(&self) -> Self {
        let mut nodes = Vec::with_capacity(self.nodes.len() + 1);
        nodes.push(Arc::default());
        nodes.extend(self.nodes.iter().cloned());
        Self {
            token: self.token.child_token(),
            nodes,
        }
    }

    /// This node's token: cancelled by [`Tasks::cancel`] here or on any node above.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Runs `task` on the runtime, tracked by this node and every node above it. The task
    /// should end soon after [`Tasks::token`] is cancelled.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        for node in &self.nodes {
            node.count(name, true);
        }
        let running = Running {
            name,
            nodes: self.nodes.clone(),
        };
        let mut task: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
            let _running = running;
            task.await;
        });
        for node in &self.nodes {
            task = Box::pin(node.tracker.track_future(task));
        }
        tokio::spawn(task);
    }

    /// Cancels this node and every node under it.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// Waits until every task of this subtree has ended (tasks spawned meanwhile included).
    pub async fn wait(&self) {
        let own = &self.nodes[0].tracker;
        own.close();
        own.wait().await;
    }

    /// [`Tasks::cancel`], then [`Tasks::wait`].
    pub async fn stop(&self) {
        self.cancel();
        self.wait().await;
    }

    /// How many tasks of this subtree are running.
    pub fn len(&self) -> usize {
        self.nodes[0].tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The running tasks of this subtree, by name, with how many of each.
    pub fn running(&self) -> BTreeMap<&'static str, usize> {
        self.nodes[0]
            .running
            .lock()
            .expect("task names lock")
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_stops_alone_and_the_root_waits_for_everything() {
        let root = Tasks::new();
        let child = root.child();
        for (node, name) in [(&root, "root task"), (&child, "child task")] {
            let token = node.token().clone();
            node.spawn(name, async move { token.cancelled().await });
        }
        assert_eq!(
            root.running().into_iter().collect::<Vec<_>>(),
            [("child task", 1), ("root task", 1)]
        );
        assert_eq!((root.len(), child.len()), (2, 1));

        child.stop().await;
        assert!(child.is_empty() && child.running().is_empty());
        assert!(!root.token().is_cancelled());
        assert_eq!(
            root.running().keys().copied().collect::<Vec<_>>(),
            ["root task"]
        );

        root.stop().await;
        assert!(root.is_empty() && root.running().is_empty());
    }

    #[tokio::test]
    async fn cancelling_the_root_cancels_the_children() {
        let root = Tasks::new();
        let grandchild = root.child().child();
        let token = grandchild.token().clone();
        grandchild.spawn("deep", async move { token.cancelled().await });
        root.stop().await;
        assert!(grandchild.token().is_cancelled());
        assert!(grandchild.is_empty());
    }
}
